#!/bin/bash
# The test suite's own Slurm cluster on this one machine (root, Debian packages from
# .ci/install_slurm.sh, no systemd). Node nI runs its slurmd in its own network, UTS and mount
# namespace: its own IP on a bridge and its own hostname, so a multi-node job rendezvous by host
# name over a real network, as on a cluster.
#
# usage: slurm_cluster.sh start [N] | stop | status
#   start N  N nodes n1..nN (default 2); idempotent: a healthy cluster of N nodes is reused.
#            Prints the line `export SLURM_CONF=...` that clients (sbatch, squeue) need.
# env: HARNESS_SLURM_ID    which cluster, 0-63 (default 0): its bridge hsbr<ID>, subnet 10.78.<ID>,
#                          namespaces hs<ID>_nI and slurmctld port 16817+ID are its own (id 0
#                          keeps the earlier hs_nI and 6817), so clusters of different ids run
#                          side by side and each stops only itself
#                          (tests/slurm_fixtures.py gives each pytest run an id of its own, 1-63)
#      HARNESS_SLURM_DIR   all state, config, logs and the munge socket (default /tmp/harness-slurm
#                          for id 0, /tmp/harness-slurm.<ID> otherwise)
#      HARNESS_SLURM_CPUS  CPUs each node advertises (default 4; nothing is bound, so more than the
#                          machine has is fine)
#      HARNESS_SLURM_GPUS  fake GPUs per node through GRES (default 0)
set -euo pipefail
ID=${HARNESS_SLURM_ID:-0}
[[ $ID =~ ^([0-9]|[1-5][0-9]|6[0-3])$ ]] || { echo "HARNESS_SLURM_ID must be 0..63, got '$ID'" >&2; exit 2; }
# P: this cluster's namespaces (${P}nI) and host-side veth ends (${P}vI)
if [ "$ID" = 0 ]; then
  D=${HARNESS_SLURM_DIR:-/tmp/harness-slurm}; P=hs_; CTLD_PORT=6817
else
  D=${HARNESS_SLURM_DIR:-/tmp/harness-slurm.$ID}; P=hs${ID}_; CTLD_PORT=$((16817 + ID))
fi
CPUS=${HARNESS_SLURM_CPUS:-4}
GPUS=${HARNESS_SLURM_GPUS:-0}
NET=10.78.$ID   # the bridge is .1 (slurmctld), node nI is .(10+I)
BR=hsbr$ID
export SLURM_CONF=$D/etc/slurm.conf

running() {  # a zombie does not count: in a container no init may reap our daemons
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) && [[ ${st##*) } != Z* ]]  # state follows "(comm) "
}
alive() { [ -s "$1" ] && running "$(cat "$1")"; }

healthy() {  # $1 = wanted node count: every daemon of a cluster of that shape is alive
  [ "$(cat "$D/state/shape" 2>/dev/null)" = "$1 $CPUS $GPUS" ] || return 1
  alive "$D/state/munged.pid" && alive "$D/state/slurmctld.pid" || return 1
  for i in $(seq "$1"); do alive "$D/state/slurmd_n$i.pid" || return 1; done
}

write_conf() {  # $1 = node count
  local n=$1 gres="" i
  mkdir -p "$D/etc" "$D/state/ctld" "$D/log"
  if [ "$GPUS" -gt 0 ]; then  # fake GPU devices: character devices identical to /dev/null
    gres="Gres=gpu:$GPUS"; mkdir -p "$D/dev"
    for i in $(seq 0 $((GPUS - 1))); do mknod "$D/dev/gpu$i" c 1 3; done
    echo "NodeName=n[1-$n] Name=gpu File=$D/dev/gpu[0-$((GPUS - 1))]" > "$D/etc/gres.conf"
  fi
  # cgroup/v1 named explicitly: autodetection fails without a usable cgroup fs, and nothing here
  # needs cgroups (proctrack/linuxproc, task/none)
  echo "CgroupPlugin=cgroup/v1" > "$D/etc/cgroup.conf"
  # cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
  cat > "$SLURM_CONF" <<EOF
ClusterName=harness
SlurmctldHost=$(hostname -s)($NET.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/socket,cred_expire=10
StateSaveLocation=$D/state/ctld
SlurmdSpoolDir=$D/state/spool_%n
SlurmctldPidFile=$D/state/slurmctld.pid
SlurmdPidFile=$D/state/slurmd_%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd_%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=0
MessageTimeout=10
SlurmdTimeout=30
# SIGTERM to SIGKILL: Slurm's default, as on real clusters (the trainer saves, then W&B)
KillWait=30
MinJobAge=300
$([ "$GPUS" -gt 0 ] && echo GresTypes=gpu)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  printf '127.0.0.1 localhost\n%s.1 %s\n' $NET "$(hostname -s)" > "$D/etc/hosts"
  for i in $(seq "$n"); do
    echo "NodeName=n$i NodeHostname=n$i NodeAddr=$NET.$((10 + i)) CPUs=$CPUS RealMemory=1000 $gres" >> "$SLURM_CONF"
    echo "$NET.$((10 + i)) n$i" >> "$D/etc/hosts"
  done
}

start_munge() {  # a private munged on a socket under $D: the machine's own munge stays untouched
  mkdir -p "$D/munge"; chmod 711 "$D/munge"
  mungekey -c -k "$D/munge/key"
  munged --socket="$D/munge/socket" --key-file="$D/munge/key" --pid-file="$D/state/munged.pid" \
    --log-file="$D/log/munged.log" --seed-file="$D/munge/seed"
  for _ in $(seq 50); do munge -n -S "$D/munge/socket" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "munged does not answer, see $D/log/munged.log" >&2; return 1
}

start_node() {  # $1 = node index
  local ns=${P}n$1
  ip netns add $ns
  ip link add ${P}v$1 type veth peer name eth0 netns $ns
  ip link set ${P}v$1 master $BR up
  ip -n $ns addr add $NET.$((10 + $1))/24 dev eth0
  ip -n $ns link set eth0 up
  ip -n $ns link set lo up
  # nsenter, not `ip netns exec`: that remounts /sys, and slurmd then finds no cgroup fs
  nsenter --net=/run/netns/$ns unshare --uts --mount sh -c \
    "mount --bind '$D/etc/hosts' /etc/hosts && hostname n$1 && exec slurmd -f '$SLURM_CONF' -N n$1"
}

wait_idle() {  # $1 = node count
  for _ in $(seq 300); do
    [ "$(sinfo -h -o '%t %D' 2>/dev/null)" = "idle $1" ] && return
    sleep 0.1
  done
  echo "nodes not idle after 30 s:" >&2; sinfo -N >&2 || true; tail -n 5 "$D"/log/*.log >&2; return 1
}

start() {
  local n=${1:-2} i
  [[ $n =~ ^[1-9][0-9]?$ ]] || { echo "start: N must be 1..99, got '$n'" >&2; exit 2; }
  if healthy "$n"; then echo "export SLURM_CONF=$SLURM_CONF"; return; fi
  stop
  rm -rf "$D/log"  # stop keeps the logs of the last cluster for a post-mortem
  mkdir -p "$D/state" "$D/log"
  write_conf "$n"
  start_munge
  ip link add $BR type bridge
  ip addr add $NET.1/24 dev $BR
  ip link set $BR up
  slurmctld -f "$SLURM_CONF"
  for i in $(seq "$n"); do start_node "$i"; done
  echo "$n $CPUS $GPUS" > "$D/state/shape"
  wait_idle "$n"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pids() {  # TERM the daemons behind these pid files, KILL what is left after 10 s
  local f pids="" p left=""
  for f in "$@"; do alive "$f" && pids="$pids $(cat "$f")"; done
  [ -n "$pids" ] || return 0
  kill $pids 2>/dev/null || true
  for _ in $(seq 100); do
    left=""
    for p in $pids; do running "$p" && left="$left $p"; done
    [ -n "$left" ] || return 0
    sleep 0.1
  done
  kill -9 $left 2>/dev/null || true
}

stop() {  # also cleans up after a crashed or half-started cluster of this id (only this id)
  local ns
  if alive "$D/state/slurmctld.pid"; then  # cancel jobs first so their steps and tasks go away
    scancel --full $(squeue -h -o %A 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
  fi
  stop_pids "$D"/state/slurmd_*.pid "$D/state/slurmctld.pid" "$D/state/munged.pid"
  for ns in $(ip netns list 2>/dev/null | awk -v p="^${P}n[0-9]+$" '$1 ~ p {print $1}'); do
    ip netns del "$ns"
  done
  ip link del $BR 2>/dev/null || true
  rm -rf "$D/state" "$D/etc" "$D/munge" "$D/dev"
}

status() {
  if ! alive "$D/state/slurmctld.pid"; then echo "stopped"; return 3; fi
  sinfo -N
  squeue
}

case "${1:-}" in
  start) start "${2:-2}" ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [N] | stop | status" >&2; exit 2 ;;
esac

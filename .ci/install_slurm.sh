#!/bin/bash
# Debian packages for the Slurm tests (tests/slurm_cluster.sh): Slurm's daemons and clients,
# munge for authentication, iproute2 for the nodes' network namespaces. Needs root.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && command -v ip >/dev/null; then
  exit 0
fi
# without systemd the packages' postinst scripts would try to start the daemons: forbid it
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  slurmd slurmctld slurm-client munge iproute2

"""Each tensor-parallel group on one host (harness/parallel/tp_layout.py): the rule on host lists,
and the real `harness train` at start-up, with one rank given another host name (its own UTS
namespace: a different hostname, the same network) so that one machine holds "two hosts"."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
from engine_utils import child_env, retry_on_port_clash

from harness.common.errors import HarnessError
from harness.config import load_config
from harness.parallel.batch import make_plan
from harness.parallel.tp_layout import check_tp_hosts, spanning_group_error

BLOCK = ["n1"] * 4 + ["n2"] * 4  # srun's default: ranks numbered node by node
CYCLIC = ["n1", "n2"] * 4  # srun --distribution=cyclic: round-robin over the nodes


@pytest.mark.parametrize("hosts, tp", [(BLOCK, 4), (BLOCK, 2), (BLOCK, 1), (CYCLIC, 1),
                                       (["a"] * 8, 8)])
def test_groups_inside_one_host_pass(hosts, tp):
    assert spanning_group_error(hosts, tp) is None


@pytest.mark.parametrize("hosts, tp, what", [
    (CYCLIC, 4, "2 of 2 tensor-parallel groups span hosts (group 0: ranks 0-3 on n1, n2, n1, n2)"),
    (BLOCK, 8, "1 of 1 tensor-parallel groups span hosts (group 0: ranks 0-7 on n1, n1, n1, n1, "
               "n2, n2, n2, n2)"),
    # 3 tasks on one node and 5 on the other: tp=2 divides neither count evenly into groups
    (["n1"] * 3 + ["n2"] * 5, 2, "1 of 4 tensor-parallel groups span hosts (group 1: ranks 2-3 "
                                 "on n1, n2)"),
])
def test_a_group_across_hosts_is_refused_in_one_line(hosts, tp, what):
    error = spanning_group_error(hosts, tp)
    assert error.startswith(f"parallel.tensor_parallel_size={tp}: {what}")
    assert "\n" not in error
    assert "block distribution" in error and "--distribution=cyclic" in error  # the fix


def test_a_long_group_is_cut_short_in_the_message():
    error = spanning_group_error(["a"] * 63 + ["b"], 64)
    assert "ranks 0-63 on " + "a, " * 16 + "..." in error and ", b" not in error


def test_the_check_reads_the_start_up_host_table():
    # the table is gathered once at start-up at every world size
    # (harness.parallel.peers.gather_hosts, also for naming a rank that goes away); the check itself
    # makes no collective
    plan = make_plan(load_config("tiny", ["parallel.tensor_parallel_size=2"]), 4)
    check_tp_hosts(BLOCK[:4], plan)
    with pytest.raises(HarnessError, match="span hosts"):
        check_tp_hosts(CYCLIC[:4], plan)


# ---- the real trainer, 2 ranks on gloo ---------------------------------------------------
TRAIN = ["--config", "tiny", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
         "model.block_size=32", "parallel.tensor_parallel_size=2",
         "train.global_batch_size=2", "train.micro_batch_size=2", "train.max_steps=1",
         "optim.warmup_steps=1", "checkpoint.every=0", "data.eval_every=0"]


def train_two_ranks(tmp_path, shards, rank1_host=None) -> list[subprocess.CompletedProcess]:
    """`harness train` as 2 ranks of one tensor-parallel group; rank 1 under `rank1_host`.
    Started by hand, so rank 0 needs a port up front: a new one (and a fresh run directory)
    when it finds the port taken (engine_utils.retry_on_port_clash)."""

    def launch(port):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        ranks = _start_two_ranks(tmp_path, shards, rank1_host, port)
        return ranks, "".join(r.stdout + r.stderr for r in ranks)

    return retry_on_port_clash(launch)


def _start_two_ranks(tmp_path, shards, rank1_host, port) -> list[subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "harness.cli", "train", *TRAIN, f"data.out_dir={shards}",
           f"train.run_dir={tmp_path / 'run'}"]
    procs = []
    for rank in (0, 1):
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        argv = cmd
        if rank == 1 and rank1_host:  # a new UTS namespace: its own hostname, nothing else
            env["LOCAL_RANK"] = "0"  # the first rank on its "host"
            argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', rank1_host,
                    *cmd]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


needs_uts = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a second host name needs root and unshare (a UTS namespace)")


@pytest.mark.slow
@needs_uts
def test_train_refuses_a_tensor_parallel_group_across_two_hosts(tmp_path, shards_dir):
    here = socket.gethostname()
    ranks = train_two_ranks(tmp_path, shards_dir, rank1_host="tp-elsewhere")
    for proc in ranks:
        # both ranks see the same host table and leave together: none waits in a collective
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert errors == [
            "error: " + spanning_group_error([here, "tp-elsewhere"], 2)], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    # refused before any data was read or any step logged
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_train_on_one_host_passes_the_check_and_trains(tmp_path, shards_dir):
    ranks = train_two_ranks(tmp_path, shards_dir)
    for proc in ranks:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"step": 1' in (tmp_path / "run" / "metrics.jsonl").read_text()

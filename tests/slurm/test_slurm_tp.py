"""Tensor-parallel groups under the real srun (tests/slurm_cluster.sh, 2 nodes x 4 fake GPUs): the
harness's own batch script for nodes=2, gpus_per_node=4, tensor_parallel_size=4 keeps each
group of 4 consecutive ranks inside one node; with --distribution=cyclic in the script (the
config refuses it in slurm.extra_sbatch, but cannot see an edited script or a site's default)
the start-up check refuses the run in one line, exit 2.

Eight real trainers would take minutes on 2 cores: a stand-in for `python` runs the part of
start-up that decides the layout: the job config, the harness's rank mapping
(harness.parallel.distributed, harness.parallel.batch), a gloo process group across the nodes and
harness.parallel.tp_layout's check, the one `harness train` makes (tests/parallel/test_tp_layout.py
runs that one for real)."""
import re
import sys
from pathlib import Path

import pytest
from slurm_fixtures import slurm_gpu_cluster  # noqa: F401  (fixture)

from harness.config import load_config, to_yaml
from harness.parallel.tp_layout import spanning_group_error
from harness.slurm.sbatch import render_sbatch

pytestmark = pytest.mark.slow

PROBE = """
import os, socket, sys
import torch.distributed as dist
from harness.parallel import distributed
from harness.parallel.collectives import Collectives
from harness.config import load_config
from harness.common.errors import HarnessError
from harness.parallel.batch import make_plan
from harness.parallel.peers import gather_hosts
from harness.parallel.tp_layout import check_tp_hosts

cfg = load_config(sys.argv[sys.argv.index("--config") + 1], [])
env = distributed.detect()  # what srun_task.sh exported, read as the trainer reads it
plan = make_plan(cfg, env.world_size)
print(f"rank={env.rank} procid={os.environ['SLURM_PROCID']} node={os.environ['SLURMD_NODENAME']} "
      f"host={socket.gethostname()} group={plan.dp_rank(env.rank)} "
      f"tp_rank={plan.tp_rank(env.rank)}", flush=True)
dist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                        rank=env.rank, world_size=env.world_size)
code = 0
try:
    check_tp_hosts(gather_hosts(Collectives("cpu"), env.rank, env.world_size), plan)
    print(f"rank={env.rank} layout ok", flush=True)
except HarnessError as err:  # as harness.cli reports it
    sys.stderr.write(f"error: {err}\\n")
    code = err.exit_code
dist.destroy_process_group()
sys.exit(code)
"""
LINE = re.compile(r"rank=(\d+) procid=(\d+) node=(\S+) host=(\S+) group=(\d+) tp_rank=(\d+)")
CONFIG = ["slurm.nodes=2", "slurm.gpus_per_node=4", "slurm.cpus_per_task=1",
          "slurm.time=0-00:05:00", "parallel.tensor_parallel_size=4"]


def run_job(cluster, tmp_path: Path, *directives: str) -> tuple[dict, str, dict]:
    """The harness's batch script for CONFIG (+ #SBATCH `directives` written into it), the probe
    standing in for python: (job record, its output, rank -> (node, host, group, tp_rank))."""
    cfg = load_config("tiny", CONFIG)  # the config's own checks pass
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job_config = run_dir / "job_config.yaml"
    job_config.write_text(to_yaml(cfg))
    (tmp_path / "probe.py").write_text(PROBE)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\nexec {sys.executable} {tmp_path / "probe.py"} "$@"\n')
    python.chmod(0o755)
    script = run_dir / "train.sbatch"
    text = render_sbatch(cfg.slurm, str(run_dir), ["--config", str(job_config)], str(python))
    first = text.index("#SBATCH")
    script.write_text(text[:first] + "".join(f"#SBATCH {d}\n" for d in directives)
                      + text[first:])
    job = cluster.sbatch(script)
    info = cluster.wait(job, timeout=90)
    out = (run_dir / f"slurm-{job}.out").read_text()
    ranks = {}
    for m in LINE.finditer(out):
        rank, procid, node, host, group, tp_rank = m.groups()
        assert rank == procid, out  # SLURM_PROCID is the rank
        ranks[int(rank)] = (node, host, int(group), int(tp_rank))
    return info, out, ranks


def test_sbatch_keeps_each_tensor_parallel_group_inside_a_node(slurm_gpu_cluster, tmp_path):  # noqa: F811
    info, out, ranks = run_job(slurm_gpu_cluster, tmp_path)
    assert "#SBATCH --ntasks-per-node=4" in (tmp_path / "run" / "train.sbatch").read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", out
    assert sorted(ranks) == list(range(8)), out
    for rank, (node, host, group, tp_rank) in ranks.items():
        assert node == host  # each node's tasks run in that node's own namespace
        assert (group, tp_rank) == divmod(rank, 4)
        assert node == ("n1" if group == 0 else "n2"), out  # group g on node g + 1
    assert out.count("layout ok") == 8 and "error:" not in out, out


def test_cyclic_distribution_is_refused_at_start(slurm_gpu_cluster, tmp_path):  # noqa: F811
    # --distribution in the batch script reaches srun (SLURM_DISTRIBUTION): round-robin ranks
    info, out, ranks = run_job(slurm_gpu_cluster, tmp_path, "--distribution=cyclic")
    assert info["JobState"] == "FAILED", out
    # every task that exited on its own exited 2; the first one gets the rest TERM
    # (--kill-on-bad-exit), and one still leaving then can make the step's code 143
    codes = re.findall(r"srun: error: n\d: tasks? [\d,-]+: Exited with exit code (\d+)", out)
    assert codes and set(codes) == {"2"}, out
    assert re.search(r"job step failed with exit code (2|143)$", out, re.M), out
    # not every rank gets to print before that TERM
    assert ranks and all(node == ("n1" if rank % 2 == 0 else "n2")
                         for rank, (node, _, _, _) in ranks.items()), out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert errors and set(errors) == {
        "error: " + spanning_group_error(["n1", "n2"] * 4, 4)}, out
    assert "layout ok" not in out and "Traceback" not in out, out

"""Each tensor-parallel group on one host: checked once at start-up, from the ranks' own hosts.

A tensor-parallel group all-reduces activations inside every layer, forward and backward:
over NVLink within a node, over the network across nodes, many times slower and without any
error. The config refuses a tensor_parallel_size that does not divide slurm.gpus_per_node, but
it cannot see how the ranks were actually numbered: `srun --distribution=cyclic` (or
SLURM_DISTRIBUTION in the environment), torchrun started with mixed-up --node_rank values,
nodes with different task counts. Groups are consecutive ranks (harness.parallel.batch:
rank = dp_rank x tp + tp_rank), so with the real host of every rank the check is exact.
"""
from __future__ import annotations

from typing import Sequence

from harness.common.errors import HarnessError
from harness.parallel.batch import Plan

SHOWN_RANKS = 16  # ranks of the offending group named in the message: it stays one short line


def spanning_group_error(hosts: Sequence[str], tp: int) -> str | None:
    """The refusal (one line) when a group of `tp` consecutive ranks spans more than one host;
    None when every group is on one host. hosts[r] is rank r's host."""
    groups = [hosts[start:start + tp] for start in range(0, len(hosts), tp)]
    bad = [g for g, members in enumerate(groups) if len(set(members)) > 1]
    if not bad:
        return None
    first = bad[0]
    members = groups[first]
    shown = ", ".join(members[:SHOWN_RANKS]) + (", ..." if len(members) > SHOWN_RANKS else "")
    return (f"parallel.tensor_parallel_size={tp}: {len(bad)} of {len(groups)} tensor-parallel "
            f"groups span hosts (group {first}: ranks {first * tp}-{first * tp + tp - 1} on "
            f"{shown}), so every layer's all-reduce would cross the network: number the ranks "
            f"node by node (srun's default block distribution, no --distribution=cyclic or "
            f"SLURM_DISTRIBUTION; torchrun: one --node_rank per node) with "
            f"tensor_parallel_size dividing the ranks per node")


def check_tp_hosts(hosts: Sequence[str], plan: Plan) -> None:
    """Refuse (HarnessError, on every rank alike) a tensor-parallel group that spans hosts.
    hosts: every rank's host, gathered at start-up (harness.parallel.peers.gather_hosts)."""
    error = spanning_group_error(hosts, plan.tp_size)
    if error is not None:
        raise HarnessError(error)

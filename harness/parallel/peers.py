"""When a collective fails because a rank went away: which rank, on which host, in one line.

A rank that dies (a crash, kill -9, the OOM killer) closes its sockets: gloo's collectives on
the others raise "Connection closed by peer" within a second. A node that is lost without a
word (power, network) answers nothing: the others wait in their collective until the process
group's timeout, `parallel.collective_timeout_s`. Either way the error names a socket, not a
rank, and in a ring the peer that closed on us may be a survivor that failed first. So the
survivors hold a roll call on the rendezvous store (the TCPStore rank 0 serves at
MASTER_ADDR:MASTER_PORT): each writes its rank, waits ROLL_CALL_S, and names the ranks that did
not answer, with their hosts (gathered once at start-up by `record`). A store that cannot be
reached means rank 0's process, which serves it, is gone.

The line is a `RankLost` error (exit code LOST_RANK_EXIT_CODE), which the batch script counts
as a failed step: it does not requeue it; Slurm requeues a job whose node it marked down.
Imports: torch.distributed, harness.common.errors.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass
from typing import Optional

import torch

from harness.common.errors import HarnessError

# Linux's HOST_NAME_MAX: gethostname() returns at most this many bytes
HOST_BYTES = 64
LOST_RANK_EXIT_CODE = 4
ROLL_CALL_S = 10.0  # how long survivors wait for each other: every survivor fails by then
# what gloo's collectives raise when a peer is gone (torch 2.x); NCCL's errors, and the store's
# network errors, come as torch.distributed.DistBackendError / DistNetworkError
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
             "Socket Timeout", "Broken pipe")


class RankLost(HarnessError):
    exit_code = LOST_RANK_EXIT_CODE


@dataclass
class Roster:
    rank: int
    hosts: list[str]  # hosts[r]: rank r's host
    timeout_s: float


_roster: Optional[Roster] = None


def gather_hosts(comm, rank: int, world: int) -> list[str]:
    """Every rank's host name, on every rank (a collective: all ranks must call it).

    One all-reduce of a world x HOST_BYTES table in which each rank fills only its own row:
    the sum is the whole table. Built on the engine's device, as NCCL requires."""
    name = socket.gethostname().encode()[:HOST_BYTES]
    table = torch.zeros(world, HOST_BYTES, dtype=torch.uint8)
    if name:
        table[rank, :len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    table = comm.all_reduce(table.to(comm.device)).cpu()
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in table.tolist()]


def bound_every_group(timeout_s: float) -> int:
    """Give every process group of this rank the timeout of the world's. DeepSpeed makes its
    data- and tensor-parallel groups with torch's default (30 minutes for gloo), not the one
    init_distributed was given, and a gradient all-reduce on such a group would wait that
    long for a lost node. torch has no public setter for an existing group: its
    `_set_pg_timeout` (torch >= 2.2) is the one place that knows each backend. Returns the
    number of groups set."""
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    groups = [g for g in list(c10d._world.pg_map) if not c10d._rank_not_in_group(g)]
    for group in groups:
        c10d._set_pg_timeout(timeout, group)
    return len(groups)


def record(rank: int, hosts: list[str], timeout_s: float) -> None:
    """Remember this process's rank and every rank's host (engine.build, once)."""
    global _roster
    _roster = Roster(rank, list(hosts), timeout_s)


def is_peer_gone(err: BaseException) -> bool:
    if isinstance(err, (torch.distributed.DistBackendError, torch.distributed.DistNetworkError)):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in PEER_GONE)


def _roll_call(roster: Roster) -> Optional[list[int]]:
    """The ranks that did not answer within ROLL_CALL_S; None when the store is gone."""
    try:
        store = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=datetime.timedelta(seconds=ROLL_CALL_S), wait_for_workers=False)
        store.set(f"harness/roll_call/{roster.rank}", "here")
    except (RuntimeError, KeyError, ValueError):  # nobody serves the store: rank 0 is gone
        return None
    keys = [f"harness/roll_call/{r}" for r in range(len(roster.hosts))]
    deadline = time.monotonic() + ROLL_CALL_S
    while True:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def _ranks(ranks: list[int], hosts: list[str]) -> str:
    shown = ", ".join(f"{r} ({hosts[r]})" for r in ranks[:8])
    return shown + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")


def explain(err: BaseException) -> Optional[RankLost]:
    """The one-line error for a collective that failed because a rank went away; None for any
    other error (or before start-up recorded the roster)."""
    roster = _roster
    if roster is None or len(roster.hosts) < 2 or not is_peer_gone(err):
        return None
    missing = _roll_call(roster)
    first = " ".join(str(err).split())[:160]
    if missing is None:
        who = f"rank 0 ({roster.hosts[0]}, which serves the rendezvous store)"
    elif missing:
        who = f"rank{'s' if len(missing) > 1 else ''} {_ranks(missing, roster.hosts)}"
    else:
        who = "no rank (every rank answered the roll call: a network fault?)"
    return RankLost(
        f"rank {roster.rank} ({roster.hosts[roster.rank]}): a collective failed and "
        f"{who} did not answer within {ROLL_CALL_S:g} s ({first}); exiting with "
        f"{LOST_RANK_EXIT_CODE}: see that rank's log for why it went; the batch script does not "
        f"requeue a failed step (Slurm requeues a job whose node went down); a collective waits "
        f"at most parallel.collective_timeout_s={roster.timeout_s:g} s")

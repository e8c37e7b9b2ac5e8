"""harness/parallel/peers.py in one process: which errors mean a rank went away, and the roll call
on a real TCPStore (the two-rank runs with kill -9 and SIGSTOP are in
tests/parallel/test_lost_rank.py)."""
from __future__ import annotations

import datetime

import pytest
import torch

from harness.parallel import peers


@pytest.fixture
def roster(monkeypatch):
    """Rank 0 of 3 on hosts a, b, c, with a rendezvous store this test serves."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=5))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setattr(peers, "ROLL_CALL_S", 0.5)
    monkeypatch.setattr(peers, "_roster", None)
    peers.record(0, ["a", "b", "c"], 600)
    return store


@pytest.mark.parametrize("err, gone", [
    (RuntimeError("[pair.cc:553] Connection closed by peer [10.0.0.2]:1762. ..."), True),
    (RuntimeError("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"), True),
    (torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1."), True),
    (RuntimeError("CUDA out of memory"), False),
    (ValueError("Connection closed by peer"), False),  # not what a collective raises
])
def test_which_errors_mean_a_rank_went_away(err, gone):
    assert peers.is_peer_gone(err) is gone


def test_the_roll_call_names_the_ranks_that_did_not_answer(roster):
    roster.set("harness/roll_call/2", "here")  # rank 2 answers; rank 1 does not
    lost = peers.explain(RuntimeError("Connection closed by peer [127.0.0.1]:1"))
    assert isinstance(lost, peers.RankLost) and lost.exit_code == peers.LOST_RANK_EXIT_CODE
    assert str(lost).startswith("rank 0 (a): a collective failed and rank 1 (b) did not answer "
                                "within 0.5 s (Connection closed by peer")
    assert "parallel.collective_timeout_s=600" in str(lost) and "\n" not in str(lost)


def test_a_gone_store_means_rank_0_went_away(roster, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "1")  # nobody serves it
    peers.record(2, ["a", "b", "c"], 600)
    lost = peers.explain(RuntimeError("Timed out waiting 600000ms for recv operation"))
    assert "rank 2 (c): a collective failed and rank 0 (a, which serves the rendezvous store)" \
        in str(lost)


def test_other_errors_are_left_alone(roster):
    assert peers.explain(RuntimeError("CUDA out of memory")) is None
    peers.record(0, ["a"], 600)  # one rank: nobody to lose
    assert peers.explain(RuntimeError("Connection closed by peer")) is None

"""Validation loss: the fixed held-out set (the same at every world size), scored with dropout
off, equals a direct computation; every rank runs the same number of forwards (ZeRO 3
all-gathers in each one), and the sum goes through the engine's collectives in one
all-reduce, also in a world of one rank."""
import json
import math
from pathlib import Path

import batched
import pytest
import torch
from engine_utils import child_env, small_cfg, tokens, torchrun

from harness.callbacks.evaluator import Evaluator, eval_set
from harness.config import load_config
from harness.data.shards import Sequences, TokenShards
from harness.model.gpt import GPT
from harness.parallel.collectives import Collectives, WrongDevice
from harness.train.engine import build

WORKER = str(Path(__file__).parents[1] / "eval_worker.py")


def test_eval_loss_is_the_mean_over_the_fixed_set():
    cfg = small_cfg("model.dropout=0.5", "train.micro_batch_size=2", "train.grad_accum_steps=1")
    built = build(cfg)
    seqs = Sequences(tokens(64, 2000, seed=3), cfg.model.block_size)
    ev = Evaluator(seqs, every=1, size=6, micro=2, rank=0, world=1)
    model = built.engine.module
    model.train()
    calls = built.comm.calls
    got = ev.evaluate(built.engine, built.comm)
    assert built.comm.calls == calls + 1  # one all-reduce, made in a world of one rank too
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        rows = torch.from_numpy(seqs.batch(eval_set(len(seqs), 6)))
        want = torch.stack([model(rows[i:i + 1, :-1], rows[i:i + 1, 1:]) for i in range(6)]).mean()
    assert abs(got - want.item()) < 1e-5
    assert ev.evaluate(built.engine, built.comm) == got  # the same set each time, no dropout
    with pytest.raises(WrongDevice):  # the sum is on the engine's device, checked by comm
        ev.evaluate(built.engine, Collectives("meta"))


@pytest.mark.parametrize("n, micro, world", [(5, 2, 2), (7, 2, 3), (2, 4, 3), (9, 2, 2)])
def test_every_rank_runs_the_same_number_of_forwards(n, micro, world):
    seqs = Sequences(tokens(64, 16 * n + 1), 16)
    evs = [Evaluator(seqs, 1, size=10 * micro * world, micro=micro, rank=r, world=world)
           for r in range(world)]
    assert len({len(ev.batches) for ev in evs}) == 1
    # padding batches are real sequences (a forward with the usual shapes) of weight 0
    assert all(len(rows) > 0 for ev in evs for rows, _ in ev.batches)
    assert sum(w for ev in evs for _, w in ev.batches) == n  # each sequence counted once
    assert sum(ev.n_sequences for ev in evs) == n


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _uneven_run(shards_dir, stage: int, run_dir: Path) -> tuple[list[str], int, list[int]]:
    """(overrides, block size, the validation set's sequences) of the 2-rank run at a ZeRO
    stage: a set of about half the split, spread over it (eval_set), whose size k = 4j + 1
    gives the 2 ranks different numbers of batches of 2 (ceil(2j + 1, 2) = j + 1 and j)."""
    val_tokens = len(TokenShards.open(shards_dir).val)
    micro, block = 2, max(4, min(48, (val_tokens - 1) // 12))  # >= 12 sequences: k >= 5
    n = (val_tokens - 1) // block
    k = 4 * ((min(n // 2, 64) - 1) // 4) + 1  # at most 61: a few forwards
    assert k >= 5 and _ceil(_ceil(k, 2), micro) != _ceil(k // 2, micro)
    overrides = ["model.n_layer=2", "model.d_model=32", "model.n_head=2",
                 f"model.block_size={block}", "train.global_batch_size=8",
                 f"train.micro_batch_size={micro}", "train.max_steps=1", "optim.warmup_steps=0",
                 "checkpoint.every=0", f"zero.stage={stage}", f"data.out_dir={shards_dir}",
                 "data.eval_every=1", f"data.eval_sequences={k}",
                 f"train.run_dir={run_dir}", "wandb.mode=disabled"]
    chosen = eval_set(n, k).tolist()
    assert chosen != list(range(k)) and chosen[-1] > n // 2  # spread over the whole split
    return overrides, block, chosen


@pytest.fixture(scope="module")
def uneven_runs(request, tmp_path_factory, shards_dir) -> batched.Outcome:
    """Every selected stage's 2-rank run in one torchrun launch (tests/batched.py): rank 0
    writes OUT/<stage>/params.pt, the run directory is RUNS/<stage>. A case that hangs (before
    the fix rank 0 waited for ever in its extra forward's all-gather at ZeRO 3) is stopped
    after 150 s, SIGTERM to torchrun, which passes it on to the ranks, and fails its test."""
    tmp = tmp_path_factory.mktemp("uneven")
    out, runs = tmp / "out", tmp / "runs"
    stages = [p["stage"] for p in batched.launched_params(
        request, "test_two_ranks_with_uneven_batches_finish_and_match_plain_pytorch")]
    cases = {str(s): _uneven_run(shards_dir, s, runs / str(s))[0] for s in stages}
    outcome = batched.launch(lambda spec: torchrun(2, WORKER, "--cases", str(spec), str(out)),
                             out, cases, child_env(), case_timeout=150)
    outcome.runs = runs
    return outcome


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_two_ranks_with_uneven_batches_finish_and_match_plain_pytorch(uneven_runs, shards_dir,
                                                                      stage):
    run_dir = uneven_runs.runs / str(stage)
    overrides, block, chosen = _uneven_run(shards_dir, stage, run_dir)
    params = torch.load(uneven_runs.dir(str(stage)) / "params.pt")  # fails if it hung
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = next(r["eval/loss"] for r in lines if "eval/loss" in r)

    cfg = load_config("tiny", overrides)
    model = GPT(cfg.model)
    loaded = model.load_state_dict(params, strict=False)
    assert loaded.missing_keys == ["lm_head.weight"] and not loaded.unexpected_keys  # tied
    model.eval()
    val = TokenShards.open(shards_dir).val
    rows = torch.from_numpy(Sequences(val, block).batch(chosen))
    with torch.no_grad():
        want = model(rows[:, :-1], rows[:, 1:]).item()  # every sequence has the same length
    assert got == pytest.approx(want, rel=1e-5)
    # eval/bpb from both ranks' halves = the whole set's loss over its decoded UTF-8 bytes
    from harness.checkpoint import io as checkpoint_io

    tok = checkpoint_io.load_tokenizer(cfg, run_dir)
    n_bytes = sum(len(tok.decode(row[1:].tolist()).encode()) for row in rows)
    bpb = next(r["eval/bpb"] for r in lines if "eval/bpb" in r)
    assert bpb == pytest.approx(want / math.log(2) * rows[:, 1:].numel() / n_bytes, rel=1e-3)

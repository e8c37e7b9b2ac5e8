"""`harness eval`: nats, loss, perplexity and bits per byte on text, checked by hand; the
sliding windows; any ZeRO stage's checkpoint; eval/bpb in the training metrics (issue 15)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from engine_utils import full_params
from trained_runs import BASE, train_run

from harness.after.evaluate_text import score_texts, windows
from harness.callbacks.evaluator import eval_set, eval_set_size
from harness.checkpoint import io as checkpoint_io
from harness.cli import main
from harness.config import load_config
from harness.data.tokenizer import piece_bytes
from harness.train.run import make_trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory, shards_dir):
    return train_run(tmp_path_factory.mktemp("eval") / "run", shards_dir, "data.eval_every=1")


def _eval(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


class Uniform(nn.Module):
    """Every token equally likely: log p = -ln V for every prediction."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab)


def test_bits_per_byte_by_hand(run):
    tok = checkpoint_io.load_tokenizer(checkpoint_io.load_config_of(run), run)
    text = "héllo\tworld\n    ✓ 中文\n"
    # h é l l o: 1+2+1+1+1; tab 1; world 5; newline 1; 4 spaces; ✓ 3; space 1;
    # 中文 3+3; newline 1
    n_bytes = 6 + 1 + 5 + 1 + 4 + 3 + 1 + 6 + 1
    assert len(text.encode()) == n_bytes == 28
    n = len(tok.encode(text))
    totals = score_texts(Uniform(512), tok, [text], block=8, stride=3)
    assert totals.tokens == n and totals.bytes == 28 and totals.documents == 1
    # fp32 log-softmax, summed in fp64
    assert totals.nats == pytest.approx(n * math.log(512), rel=1e-7)
    summary = totals.summary()
    assert summary["bits_per_byte"] == pytest.approx(n * 9 / 28, rel=1e-7)  # log2 512 = 9
    assert summary["perplexity"] == pytest.approx(512, rel=1e-7)


def test_eval_cli_equals_a_full_context_forward(run, tmp_path, capsys):
    """A document shorter than block_size: every token predicted from </s> + all before it."""
    loaded = checkpoint_io.load(run)
    tok = checkpoint_io.load_tokenizer(loaded.cfg, run)
    text = "def add(a, b):\n\treturn a + b  # é\n"
    ids = tok.encode(text)
    assert len(ids) < loaded.cfg.model.block_size
    path = tmp_path / "held_out.txt"
    path.write_text(text, encoding="utf-8")
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([[tok.eos_id] + ids[:-1]]))[0], -1)
    nats = -logp[torch.arange(len(ids)), torch.tensor(ids)].double().sum().item()
    out = _eval(capsys, run, "--data", path)
    assert out["tokens"] == len(ids) and out["bytes"] == path.stat().st_size
    assert out["nats"] == pytest.approx(nats, rel=1e-6)
    assert out["bits_per_byte"] == pytest.approx(nats / math.log(2) / path.stat().st_size,
                                                 rel=1e-6)
    assert out["loss"] == pytest.approx(nats / len(ids), rel=1e-6)
    # the stride changes nothing for a document that fits one window
    assert _eval(capsys, run, "--data", path, "--stride", 5)["nats"] == pytest.approx(nats, 1e-6)


@pytest.mark.parametrize("n,block,stride", [(1, 4, 4), (4, 4, 4), (5, 4, 4), (23, 8, 3),
                                            (100, 16, 1), (17, 16, 16)])
def test_windows_score_every_token_once_with_context(n, block, stride):
    scored = []
    for i, (a, t0, t1) in enumerate(windows(n, block, stride)):
        assert t1 - 1 - a <= block  # the input fits the model
        if i:  # after the first: at most `stride` targets, >= block - stride tokens before
            assert t1 - t0 <= stride
            assert t0 - 1 - a >= block - stride or a == 0
        scored += range(t0, t1)
    assert scored == list(range(1, n + 1))


def test_max_tokens_and_jsonl_and_directories(run, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("import os\n" * 30)
    docs = [{"text": "first document é"}, {"text": "second\tone"}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = _eval(capsys, run, "--data", tmp_path / "d", tmp_path / "docs.jsonl")
    assert out["documents"] == 3
    assert out["bytes"] == 300 + sum(len(d["text"].encode()) for d in docs)
    cut = _eval(capsys, run, "--data", tmp_path / "d", "--max-tokens", 7)
    assert cut["tokens"] == 7 and cut["documents"] == 1 and 0 < cut["bytes"] < 300


def test_eval_bpb_in_training_metrics(run, shards_dir):
    """eval/bpb = eval/loss / (ln 2 x bytes per token), bytes counted by decoding the set."""
    from harness.data.shards import TokenShards

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rec = [x for x in lines if "eval/loss" in x][-1]
    shards = TokenShards.open(shards_dir)
    cfg = checkpoint_io.load_config_of(run)
    seqs = shards.sequences("val", cfg.model.block_size)
    chosen = eval_set(len(seqs), eval_set_size(cfg))
    rows = [seqs[int(i)][1:].tolist() for i in chosen]  # each sequence's targets
    tok = checkpoint_io.load_tokenizer(cfg, run)
    decoded = sum(len(tok.decode(row).encode("utf-8")) for row in rows)
    targets = sum(rows, [])
    assert int(piece_bytes(tok.path)[targets].sum()) == pytest.approx(decoded, abs=3 * len(rows))
    assert rec["eval/bpb"] == pytest.approx(
        rec["eval/loss"] / math.log(2) * len(targets) / decoded, rel=1e-3)


def test_eval_split_val_equals_the_trainers_eval_loss(run, shards_dir, capsys):
    """`harness eval RUN --split val --trainer-set` (the trainer's fixed validation set,
    eval_set's sequences spread over the split) gives the trainer's own eval/loss and eval/bpb
    at the checkpoint's step; by default it scores the whole split."""
    from harness.data.shards import TokenShards

    cfg = checkpoint_io.load_config_of(run)
    block = cfg.model.block_size
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rec = [x for x in rec if "eval/loss" in x][-1]
    val = TokenShards.open(shards_dir).sequences("val", block)
    total = min(len(val), eval_set_size(cfg))
    out = _eval(capsys, run, "--split", "val", "--trainer-set")
    assert out["step"] == rec["step"] == cfg.train.max_steps
    assert out["windows"] == total and out["tokens"] == total * block
    assert out["loss"] == pytest.approx(rec["eval/loss"], rel=1e-6)
    assert out["bits_per_byte"] == pytest.approx(rec["eval/bpb"], rel=1e-6)
    if total < len(val) - 1:  # a set of some of the split's sequences: not the first ones
        first = _eval(capsys, run, "--split", "val", "--max-tokens", total * block)
        assert first["loss"] != pytest.approx(out["loss"], rel=1e-6)
    whole = _eval(capsys, run, "--split", "val", "--batch-size", 64)
    assert whole["tokens"] == whole["split_tokens"] - 1 == len(val.tokens) - 1
    assert whole["windows"] == -(-whole["tokens"] // block)
    assert main(["eval", str(run), "--split", "val", "--trainer-set", "--max-tokens", "9"]) == 2
    assert "leave out --max-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_checkpoint_loads_the_trained_weights(tmp_path, shards_dir, capsys, precision):
    """ZeRO 3 keeps only placeholders in the module file: the weights come from the
    optimizer partitions (DeepSpeed's zero_to_fp32), equal to the engine's own; in bf16 the
    fp32 masters, which round to the bf16 weights the engine trained with (its optimizer
    files are named like BF16_Optimizer's, which zero_to_fp32 cannot read: bench/gpu_check.py
    found `harness export` failing on them)."""
    cfg = load_config("tiny", [*BASE, "zero.stage=3", f"train.run_dir={tmp_path / 'run'}",
                               f"data.out_dir={shards_dir}", f"train.precision={precision}"])
    trainer, _ = make_trainer(cfg)
    trainer.fit()
    want = {n: p.detach().clone() for n, p in full_params(trainer.engine)}
    got = checkpoint_io.load(tmp_path / "run").model.state_dict()
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name].to(tensor.dtype), tensor), name
    text = tmp_path / "t.txt"
    text.write_text("x = 1\n")
    assert _eval(capsys, tmp_path / "run", "--data", text)["tokens"] > 0


@pytest.mark.slow  # two ranks under torchrun
def test_two_rank_bf16_checkpoint_loads_its_master_weights(tmp_path, shards_dir):
    """Saved by 2 ranks, bf16 at ZeRO 1 (DeepSpeed's BF16_Optimizer: each rank holds half of
    every group's fp32 master weights, a format zero_to_fp32 cannot read): loaded in a plain
    process, the masters round to exactly the bf16 weights both ranks trained with."""
    import subprocess
    from pathlib import Path

    from engine_utils import child_env, torchrun

    worker = Path(__file__).parents[1] / "dist_worker.py"
    args = [str(tmp_path / "out"), "0", *BASE, "train.global_batch_size=8",
            "train.precision=bf16", "zero.stage=1", f"train.run_dir={tmp_path / 'run'}",
            f"data.out_dir={shards_dir}"]
    proc = subprocess.run(torchrun(2, str(worker), *args), env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = torch.load(tmp_path / "out" / "rank1.pt")
    step = tmp_path / "run" / "checkpoints" / "step00000002" / "ds"
    assert len(list(step.glob("bf16_zero_pp_rank_*_optim_states.pt"))) == 2
    got = checkpoint_io.load(tmp_path / "run").model.state_dict()
    for name, tensor in trained.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(got[name].to(torch.bfloat16), tensor), name
        assert got[name].dtype == torch.float32

"""After training: `harness export --to hf` time, and `harness eval` throughput against the
training forward pass (CPU).

    python bench/bench_eval.py [--quick] [--rounds N] [--out FILE.json]

A run of the preset (gpt2-small: 124M, bf16, ZeRO 1, as the preset trains; micro batch 1 so it
fits a CPU) trains 2 steps and saves its checkpoint through the harness's Checkpointer. Then:

  - export: the whole command, checkpoint verification (checksums), DeepSpeed's zero_to_fp32
    for the fp32 master weights, safetensors and the tokenizer; target < 30 s for gpt2-small;
  - eval vs training forward, per token, measured in alternation on the same model: `harness
    eval`'s scorer (windows of block_size, batch = the micro batch, fp32 on the CPU, no_grad)
    over a text of a few windows, and the training forward (model(x, y) with autograd on, as
    the trainer calls it) on the same number of tokens; ratio = eval time / forward time per
    token, target <= 1.2.
--quick: the tiny preset (CI runs it through tests/bench/test_bench_quick.py).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from common import alternate, bench_parser, median, print_table, save_json, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _trained_run(preset: str, shards: str, tmp: str) -> Path:
    from harness.config import load_config
    from harness.train.run import make_trainer

    run_dir = Path(tmp) / preset
    cfg = load_config(preset, [f"data.out_dir={shards}", f"train.run_dir={run_dir}",
                               "train.global_batch_size=1", "train.micro_batch_size=1",
                               "train.max_steps=2", "optim.warmup_steps=1", "train.device=cpu",
                               "data.vocab_size=512", "data.allow_toy_corpus=true",
                               "checkpoint.every=0", "data.eval_every=0",
                               "monitor.enabled=false", "wandb.mode=disabled"])
    trainer, _ = make_trainer(cfg)
    trainer.fit()  # saves at the end
    return run_dir


def _eval_vs_forward(run_dir: Path, rounds: int, windows: int, micro: int) -> dict:
    from harness.after.evaluate_text import score_texts
    from harness.checkpoint import io as checkpoint_io
    from harness.data.corpus import stdlib_dir

    loaded = checkpoint_io.load(run_dir)
    tok = checkpoint_io.load_tokenizer(loaded.cfg, run_dir)
    block, model = loaded.cfg.model.block_size, loaded.model
    ids: list[int] = []
    for f in sorted(stdlib_dir().glob("*.py")):
        ids += tok.encode(f.read_text(encoding="utf-8"))
        if len(ids) >= windows * block:
            break
    text = tok.decode(ids[:windows * block - 8])  # one document of about `windows` windows
    n = len(tok.encode(text))
    x = torch.randint(0, loaded.cfg.model.vocab_size, (micro, block))

    def evaluate():
        score_texts(model, tok, [text], block, batch_size=micro)

    def forward():  # the trainer's forward: train mode, autograd recording, the loss
        model.train()
        for _ in range(-(-n // (micro * block))):
            model(x, x).detach()
        model.eval()

    times = alternate({"eval": evaluate, "forward": forward}, rounds)
    fwd_tokens = -(-n // (micro * block)) * micro * block
    eval_s, fwd_s = median(times["eval"]) / n, median(times["forward"]) / fwd_tokens
    return {"tokens": n, "eval_tokens_per_s": 1 / eval_s, "forward_tokens_per_s": 1 / fwd_s,
            "ratio": eval_s / fwd_s}


def main() -> None:
    p = bench_parser(__doc__, "the tiny preset, fewer rounds")
    args = p.parse_args()
    from harness.after.export_hf import export
    from harness.config.data import DataConfig
    from harness.data.prepare import prepare_data

    preset = "tiny" if args.quick else "gpt2-small"
    rounds = args.rounds or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        shards = f"{tmp}/shards"
        prepare_data(DataConfig(out_dir=shards, max_bytes=300_000, vocab_size=512),
                     progress=False)
        run_dir = _trained_run(preset, shards, tmp)
        exports = [timed(lambda i=i: export(run_dir, f"{tmp}/hf{i}")) for i in range(rounds)]
        speed = _eval_vs_forward(run_dir, rounds, windows=4 if args.quick else 3, micro=4)
    result = {"preset": preset, "export_s": median(exports), **speed,
              "targets": {"export_s": 30.0, "ratio": 1.2}}
    print_table(["preset", "export s", "eval tok/s", "train fwd tok/s", "eval/forward"],
                [[preset, f"{result['export_s']:.2f}", f"{speed['eval_tokens_per_s']:,.0f}",
                  f"{speed['forward_tokens_per_s']:,.0f}", f"{speed['ratio']:.3f}"]],
                title="export (whole command) and eval time per token vs the training forward")
    print(f"eval time per token / training forward: {speed['ratio']:.3f}x (target <= 1.2)")
    save_json(args.out, result)


if __name__ == "__main__":
    main()

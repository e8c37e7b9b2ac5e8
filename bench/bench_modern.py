"""Issue 13's levers, side by side in one run: step time eager vs torch.compile (through
DeepSpeed's engine.compile()) for the gpt2 and llama tiny models, and the peak bytes saved for
backward with the full-logits loss vs the chunked loss at a 32k vocabulary.

    python bench/bench_modern.py [--quick] [--rounds N] [--out FILE.json]

Step time is a full optimizer step through harness.train.trainer.Trainer on the real engine; eager
and compiled trainers run in alternation after warm-up rounds (the compile happens there).
Saved bytes come from harness.model.memory.SavedActivations over one step (exact, recompute
included). The chunked loss keeps the head input's and weight's gradients instead of
tokens x vocab fp32 logits, so the saving grows with micro batch x sequence length.
"""
from __future__ import annotations

import torch
from common import MB, alternate, bench_parser, median, print_table, save_json, synthetic_data

from harness.config import load_config
from harness.model.memory import SavedActivations
from harness.train.engine import build
from harness.train.trainer import Trainer

FULL = {"shape": [], "micro": 8, "rounds": 6, "vocab_tokens": (8, 256),
        "archs": ("gpt2", "llama")}
QUICK = {"shape": ["model.n_layer=1", "model.d_model=64", "model.n_head=2",
                   "model.block_size=64"], "micro": 2, "rounds": 2, "vocab_tokens": (2, 64),
         "archs": ("llama",)}  # one compile: CI's budget
PRESETS = {"gpt2": "tiny", "llama": "tiny-llama"}


def trainer(preset: str, setup: dict, *extra: str) -> Trainer:
    micro = setup["micro"]
    cfg = load_config(preset, [*setup["shape"], f"train.global_batch_size={micro}",
                               f"train.micro_batch_size={micro}", "train.max_steps=100000",
                               "monitor.enabled=false", *extra])
    built = build(cfg)
    return Trainer(cfg, built, synthetic_data(cfg, micro, built.device), [])


def step_times(setup: dict) -> dict[str, dict[str, float]]:
    out = {}
    for arch in setup["archs"]:
        eager = trainer(PRESETS[arch], setup)
        torch._dynamo.reset()
        compiled = trainer(PRESETS[arch], setup, "train.compile=true")
        # warm-up 2: the first compiled step compiles, the second may recompile once
        times = alternate({"eager": eager.train_step, "compiled": compiled.train_step},
                          setup["rounds"], warmup=2)
        out[arch] = {k: median(v) for k, v in times.items()}
    return out


def saved_peak(chunk: int, setup: dict) -> int:
    micro, seq = setup["vocab_tokens"]
    t = trainer("tiny", {**setup, "micro": micro}, "model.vocab_size=32000",
                f"model.block_size={seq}", f"train.loss_chunk_tokens={chunk}")
    with SavedActivations(t.engine.module.parameters()) as meter:
        t.train_step()
    return meter.peak


def main() -> None:
    p = bench_parser(__doc__, "small models, 2 rounds (CI)")
    args = p.parse_args()
    setup = dict(QUICK if args.quick else FULL)
    setup["rounds"] = args.rounds or setup["rounds"]
    times = step_times(setup)
    print_table(["arch", "eager ms", "compiled ms", "compiled / eager"],
                [(a, f"{t['eager'] * 1e3:.1f}", f"{t['compiled'] * 1e3:.1f}",
                  f"{t['compiled'] / t['eager']:.3f}") for a, t in times.items()],
                f"step time, micro {setup['micro']}, CPU inductor, {setup['rounds']} "
                f"alternating rounds after 2 warm-up")
    micro, seq = setup["vocab_tokens"]
    peaks = {chunk: saved_peak(chunk, setup) for chunk in (0, 256)}
    logits = micro * seq * 32000 * 4
    print_table(["loss", "saved MiB", "vs full logits", "fp32 logits MiB"],
                [("full logits", f"{peaks[0] / MB:.2f}", "1.000", f"{logits / MB:.2f}"),
                 ("chunked (256 tokens)", f"{peaks[256] / MB:.2f}",
                  f"{peaks[256] / peaks[0]:.3f}", "-")],
                f"peak bytes saved for backward, vocab 32000, {micro} x {seq} tokens")
    save_json(args.out, {"setup": setup, "step_seconds": times,
                         "saved_peak": {str(k): v for k, v in peaks.items()},
                         "logits_bytes": logits})


if __name__ == "__main__":
    main()

"""Data costs against corpus size: `prepare-data` and a training start, time and peak memory.

    python bench/bench_data_scale.py [--quick] [--out FILE.json]

Synthetic corpora in a temp directory, two curves: many small text files (one document each:
1e2, 1e3, 1e4 files) and one JSONL of many documents (1e3, 1e4, 1e5 lines). For each corpus,
each in a fresh process, so that its peak memory is its own (VmHWM, less the same process's
peak after its imports):

- prepare: `harness prepare-data` with a given tokenizer (trained once on the smallest
  corpus: training one samples a fixed 8 MB whatever the corpus, so it would only add a
  constant);
- start: what one rank does before its first step, without training: rank 0's check of
  data.out_dir (check_prepared_from: the manifest and a bounded stat sample), opening the
  shards, the training sequences, the sampler and its first micro-batch, the fixed validation
  set (harness.callbacks.evaluator.Evaluator, with bytes per token), at dp 8;
- full stat: walking the sources and stat-ing every file (corpus.stat_key), what rank 0 did at
  every start before issue 30 item 1, for comparison, in the start's process.

"x per 10x" lines: each measure's growth over the last tenfold step of the corpus (1.0: flat,
10: linear).
Timings on a shared machine drift; the growth ratios and the memory are what to read.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_parser, print_table, save_json  # noqa: E402

SEQ_LEN, MICRO, DP = 64, 4, 8


def hwm_mb() -> float:
    """This process's peak resident memory so far (Linux VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _text(i: int) -> str:
    return (f"document {i}: " + " ".join(f"w{(i * 7 + j) % 997}" for j in range(40)) + "\n")


def make_corpus(root: Path, kind: str, n: int) -> Path:
    """`n` text files of one document each (kind "files"), or one JSONL of n lines."""
    root.mkdir(parents=True)
    if kind == "files":
        for i in range(n):
            sub = root / f"d{i // 1000:03d}"
            sub.mkdir(exist_ok=True)
            (sub / f"f{i:06d}.txt").write_text(_text(i))
    else:
        with open(root / "docs.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": _text(i)}) + "\n")
    return root


def _data_cfg(src: str, out: str, model: str | None):
    from harness.config.data import DataConfig

    # 10%: the smallest corpora (30 documents of ~45 tokens) are split by tokens, and 1% of each
    # would leave fewer val tokens than one sequence
    return DataConfig(sources=[src], out_dir=out, vocab_size=512, val_fraction=0.1,
                      tokenizer_model=model, eval_sequences=64)


# ---- the children: each measure in a process of its own --------------------------------------
def child_prepare(src: str, out: str, model: str) -> dict:
    from harness.data import prepare as prep
    from harness.data.shards import TokenShards

    base = hwm_mb()
    start = time.perf_counter()
    prep.prepare_data(_data_cfg(src, out, model or None), progress=False)
    seconds = time.perf_counter() - start
    m = TokenShards.open(out).manifest
    return {"seconds": seconds, "peak_mb": hwm_mb() - base,
            "tokens": m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"],
            "documents": m["sources"]["documents"], "files": m["sources"]["files"],
            "manifest_kb": (Path(out) / "manifest.json").stat().st_size / 1024}


def child_start(src: str, out: str) -> dict:
    from harness.callbacks.evaluator import Evaluator
    from harness.data.corpus import source_files, stat_key
    from harness.data.out_dir import check_prepared_from
    from harness.data.sampler import GlobalSampler
    from harness.data.shards import TokenShards
    from harness.data.tokenizer import piece_bytes

    cfg = _data_cfg(src, out, None)
    cfg.tokenizer_model = str(Path(out) / "tokenizer.model")
    base = hwm_mb()
    start = time.perf_counter()
    check_prepared_from(cfg, Path(out), read_sources=False)  # every rank
    check_prepared_from(cfg, Path(out))  # rank 0
    shards = TokenShards.open(out)
    seqs = shards.sequences("train", SEQ_LEN)
    sampler = GlobalSampler(len(seqs), 1234, MICRO, 0, DP)
    seqs.batch(sampler.indices(0, 0))
    Evaluator(shards.sequences("val", SEQ_LEN), 1, cfg.eval_sequences, MICRO, 0, DP,
              piece_bytes(shards.tokenizer_path))
    seconds = time.perf_counter() - start
    peak = hwm_mb() - base
    t0 = time.perf_counter()
    stat_key(source_files(cfg.sources), 0)
    full = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": peak, "full_stat_seconds": full,
            "samples": len(seqs)}


def _run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def growth(rows: list[dict], key: str) -> str:
    """Growth per tenfold corpus over the curve's last step (the smaller corpora's costs are
    mostly constant: starting a process, reading a tokenizer)."""
    first, last = rows[-2], rows[-1]
    decades = math.log10(last["n"] / first["n"])
    if first[key] <= 0 or decades <= 0:
        return "n/a"
    return f"{(last[key] / first[key]) ** (1 / decades):.2f}x"


def main() -> None:
    parser = bench_parser(__doc__, "small corpora: 30-300 files, 300-3000 documents")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *rest = args.child
        result = child_prepare(*rest) if what == "prepare" else child_start(*rest)
        print(json.dumps(result))
        return
    from harness.data import prepare as prep

    curves = {"files": [30, 100, 300] if args.quick else [100, 1000, 10000],
              "documents": [300, 1000, 3000] if args.quick else [1000, 10000, 100000]}
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the tokenizer every preparation is given
        tok_src = make_corpus(Path(tmp) / "tok_src", "documents", 3000)
        prep.prepare_data(_data_cfg(str(tok_src), f"{tmp}/tok", None), progress=False)
        model = f"{tmp}/tok/tokenizer.model"
        for kind, sizes in curves.items():
            rows = []
            for n in sizes:
                src = make_corpus(Path(tmp) / f"{kind}{n}", kind, n)
                out = str(Path(tmp) / f"out_{kind}{n}")
                prep_r = _run_child("prepare", str(src), out, model)
                start_r = _run_child("start", str(src), out)
                rows.append({"n": n, **{f"prep_{k}": v for k, v in prep_r.items()},
                             **{f"start_{k}": v for k, v in start_r.items()}})
            results[kind] = rows
    for kind, rows in results.items():
        print_table(
            ["files", "docs", "tokens", "samples", "prep s", "prep MB", "manifest kB",
             "start ms", "start MB", "full stat ms", "start / full stat"],
            [[r["prep_files"], r["prep_documents"], r["prep_tokens"], r["start_samples"],
              f"{r['prep_seconds']:.2f}", f"{r['prep_peak_mb']:.1f}",
              f"{r['prep_manifest_kb']:.1f}", f"{r['start_seconds'] * 1e3:.1f}",
              f"{r['start_peak_mb']:.1f}", f"{r['start_full_stat_seconds'] * 1e3:.1f}",
              f"{r['start_seconds'] / r['start_full_stat_seconds']:.2f}"] for r in rows],
            title=f"\ncorpus of many {kind} (prepare with a given tokenizer; start at dp {DP}, "
                  f"seq {SEQ_LEN})")
        print(f"x per 10x {kind}: prepare time {growth(rows, 'prep_seconds')}, prepare peak "
              f"memory {growth(rows, 'prep_peak_mb')}, start time "
              f"{growth(rows, 'start_seconds')}, start peak memory "
              f"{growth(rows, 'start_peak_mb')}, full stat "
              f"{growth(rows, 'start_full_stat_seconds')}")
    save_json(args.out, results)


if __name__ == "__main__":
    main()

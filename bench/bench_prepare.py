"""prepare-data against sentencepiece alone on the same text: MB/s and MB per CPU-second at 1
and 2 workers (issue 26's target: >= 90% of sentencepiece per CPU-second).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_prepare.py [--quick] [--rounds N]
        [--max-mb MB] [--vocab V] [--sources PATH ...] [--out FILE.json]

The corpus is the built-in one (the standard library's sources) or --sources, capped at
--max-mb. A BPE tokenizer of --vocab pieces is trained once on it; then, in alternation:
- harness, w workers: the whole `harness prepare-data` with that tokenizer given (list, read
  and hash the sources, tokenize, hash for the split, write and fsync the shards and the
  manifest), into a fresh data.out_dir each time;
- sentencepiece, w threads: `SentencePieceProcessor.encode(texts, num_threads=w)` on the same
  documents' text, already in memory: the tokenizer alone, the cost the harness is held to.
CPU time is this process's (all threads) plus its children's (the harness's worker processes).
MB are the corpus's source bytes. On a shared machine the MB/s move with the load; the MB per
CPU-second and the ratios are what to read.

A second table: the readers alone (harness/data/formats.py) on the same documents written as
.jsonl, .jsonl.gz, .jsonl.zst and .parquet: MB of text per CPU-second of scan_sources (the
hashing pass) and of iter_documents (the reading pass), and their share of what sentencepiece
spends on the same text.
"""
from __future__ import annotations

import gzip
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
from common import alternate, bench_parser, median, print_table, save_json

from harness.config.data import DataConfig
from harness.data import prepare as prep
from harness.data.corpus import iter_documents, scan_sources
from harness.data.tokenizer import train_tokenizer

WORKERS = (1, 2)


def cpu_seconds() -> float:
    """This process's CPU time (all its threads) plus that of its finished children."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def measured(fn, cpu: list[float]):
    """fn, recording its CPU seconds into `cpu` (alternate() times its wall clock)."""
    def run():
        start = cpu_seconds()
        fn()
        cpu.append(cpu_seconds() - start)
    return run


def harness_run(sources: list[str], max_bytes: int, model: Path, workers: int, tmp: Path):
    def run():
        out = tmp / f"out{workers}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = DataConfig(sources=sources, max_bytes=max_bytes, out_dir=str(out),
                         tokenizer_model=str(model), num_workers=workers)
        prep.prepare_data(cfg, progress=False)
        shutil.rmtree(out)
    return run


def spm_run(model: Path, texts: list[str], workers: int):
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return lambda: sp.encode(texts, num_threads=workers)


def reader_rows(texts: list[str], tmp: Path, spm_per_cpu_s: float) -> dict[str, dict]:
    """MB of text per CPU-second of each format's scan and read passes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp / "c.jsonl").write_bytes(lines)
    (tmp / "c.jsonl.gz").write_bytes(gzip.compress(lines, 6))
    (tmp / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
    pq.write_table(pa.table({"text": texts}), tmp / "c.parquet", row_group_size=1000)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    rows = {}
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
        start = time.process_time()
        sources = scan_sources([str(tmp / name)])
        scanned = time.process_time()
        assert sum(1 for _ in iter_documents(sources, "text")) == len(texts)
        read = time.process_time()
        rows[name[2:]] = {"scan_mb_per_cpu_s": mb / max(scanned - start, 1e-9),
                          "read_mb_per_cpu_s": mb / max(read - scanned, 1e-9)}
        both = (read - start) / (mb / spm_per_cpu_s)
        rows[name[2:]]["share_of_sentencepiece"] = both
    return rows


def main() -> None:
    p = bench_parser(__doc__, "1 MB of the built-in corpus, vocab 512, 1 round")
    p.add_argument("--max-mb", type=float, default=10.0, help="corpus cap, MB (0: all)")
    p.add_argument("--vocab", type=int, default=32000, help="BPE tokenizer size")
    p.add_argument("--sources", nargs="*", default=[], help="default: the built-in corpus")
    args = p.parse_args()
    max_mb, vocab = (1.0, 512) if args.quick else (args.max_mb, args.vocab)
    rounds = args.rounds or (1 if args.quick else 3)
    max_bytes = int(max_mb * 1e6)
    prep.PARALLEL_MIN_BYTES = 0  # measure the workers asked for, whatever the input size
    sources = scan_sources(args.sources, max_bytes)
    texts = [t for t, _ in iter_documents(sources, "text")]
    mb = sum(s.bytes_used for s in sources) / 1e6
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "tokenizer.model"
        train_tokenizer(iter(texts), model, "bpe", vocab, int(mb * 1e6))
        cpu: dict[str, list[float]] = {}
        variants = {}
        for w in WORKERS:
            for name, fn in ((f"harness, {w} worker{'s' * (w > 1)}",
                              harness_run(args.sources, max_bytes, model, w, tmp)),
                             (f"sentencepiece, {w} thread{'s' * (w > 1)}",
                              spm_run(model, texts, w))):
                cpu[name] = []
                variants[name] = measured(fn, cpu[name])
        wall = alternate(variants, rounds)
        readers = reader_rows(texts, tmp, mb / median(cpu["sentencepiece, 1 thread"]))
    rows, results = [], {}
    for name in variants:
        rate, per_cpu = mb / median(wall[name]), mb / median(cpu[name])
        results[name] = {"mb_per_s": rate, "mb_per_cpu_s": per_cpu}
    for w in WORKERS:
        h = results[f"harness, {w} worker{'s' * (w > 1)}"]
        s = results[f"sentencepiece, {w} thread{'s' * (w > 1)}"]
        h["vs_sentencepiece_per_cpu_s"] = h["mb_per_cpu_s"] / s["mb_per_cpu_s"]
        h["vs_sentencepiece_per_s"] = h["mb_per_s"] / s["mb_per_s"]
        for name, r in ((f"harness, {w} worker{'s' * (w > 1)}", h),
                        (f"sentencepiece, {w} thread{'s' * (w > 1)}", s)):
            rows.append([name, f"{r['mb_per_s']:.2f}", f"{r['mb_per_cpu_s']:.2f}",
                         f"{r.get('vs_sentencepiece_per_s', 1):.2f}",
                         f"{r.get('vs_sentencepiece_per_cpu_s', 1):.2f}"])
    print_table(["variant", "MB/s", "MB per CPU-s", "vs spm MB/s", "vs spm per CPU-s"], rows,
                title=f"{mb:.1f} MB, {len(texts)} documents, BPE {vocab}, {rounds} round(s), "
                      f"medians (target: harness >= 0.90 of sentencepiece per CPU-second)")
    print()
    print_table(["format", "scan MB per CPU-s", "read MB per CPU-s", "scan + read / spm"],
                [[k, f"{r['scan_mb_per_cpu_s']:.0f}", f"{r['read_mb_per_cpu_s']:.0f}",
                  f"{r['share_of_sentencepiece']:.1%}"] for k, r in readers.items()],
                title="the readers alone, on the same documents (CPU time of one pass each)")
    save_json(args.out, {"mb": mb, "documents": len(texts), "vocab": vocab, "rounds": rounds,
                         "results": results, "readers": readers})


if __name__ == "__main__":
    main()

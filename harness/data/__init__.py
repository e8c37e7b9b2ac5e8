"""Data: text -> sentencepiece tokens -> memory-mapped shards with a manifest -> a deterministic,
resumable, rank-aware sampler. corpus.py (sources), formats.py (its readers: text, JSON lines
plain, gzip or zstd, Parquet), tokenizer.py, prepare.py (`harness
prepare-data`), prepare_part.py (its parts, a Slurm job array's tasks), cores.py (the CPUs
it may use), slices.py (its resumable work), val_split.py, source_list.py (sources.jsonl),
out_dir.py, shards.py, sampler.py, sources.py; weighted mixtures (data.mix): mixture.py (their
sampler), mix_prepare.py (their tokenizer and per-source directories) and mix_budget.py
(their token budgets' checks). Imports harness.config and harness.common only.
"""

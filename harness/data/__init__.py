"""Data: text -> sentencepiece tokens -> memory-mapped shards with a manifest -> a deterministic,
resumable, rank-aware sampler. corpus.py (sources), tokenizer.py, prepare.py (`harness
prepare-data`), shards.py, sampler.py, sources.py. Imports harness.config and harness.common
only.
"""

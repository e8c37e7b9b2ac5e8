"""After training: `harness eval` (evaluate_text.py: --data; evaluate_split.py: --split, with
evaluate_mix.py for a data.mix run's sources), `harness sample` (sample.py) and
`harness export --to hf` (export_hf.py with hf_tokenizer.py), each on a checkpoint read by
harness.checkpoint.io. May import every layer up to harness.train.
"""

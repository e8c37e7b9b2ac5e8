"""Slurm: the batch script and sbatch (sbatch.py), `harness submit` (submit.py) and
`harness prepare-data --submit` (prepare_array.py). May import every layer up to harness.train.
"""

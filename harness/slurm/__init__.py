"""Slurm: the batch script and sbatch (sbatch.py) and `harness submit` (submit.py). May import
every layer up to harness.train.
"""

"""Checkpoints: saved whole or not at all, verified before a resume, resumed bit-identically.
checkpointer.py (the callback that saves, and load), sums.py (checksums, collective
verification, the list of complete checkpoints), reshard.py (resume at another data-parallel
size), resume.py (which checkpoint a start resumes), io.py (a trained model read outside
training, for eval, sample and export). May import common, config, data, model and parallel.
"""

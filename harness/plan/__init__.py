"""`harness plan`: what a config will cost before it is submitted (planner.py: per-GPU memory,
the micro batch and checkpointing that fit). May import every layer up to harness.train.
"""

"""Pretraining harness for GPT-style language models on DeepSpeed."""

__version__ = "0.1.0"

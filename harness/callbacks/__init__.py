"""Cross-cutting concerns as small callbacks on the loop's hooks (harness.common.callback):
metrics.jsonl and the console (loggers.py), Weights & Biases (wandb_logger.py, wandb_file.py),
evaluation (evaluator.py), the spike monitor (spike_monitor.py) and throughput
(throughput.py). May import common, config, data, model, parallel, checkpoint and monitor.
"""

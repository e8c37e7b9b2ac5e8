"""What every layer may use: the one error type and its range checks (errors.py), the
one-writer lease on a directory (lease.py), fsync of files and directories (durable.py), the
metrics.jsonl format (jsonl.py), and the hooks a callback implements (callback.py). Imports
nothing from the harness.
"""

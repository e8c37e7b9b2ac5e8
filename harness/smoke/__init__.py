"""`harness smoke`: the CI smoke test a user's runner can afford (minutes, one GPU or a CPU).

Prepares a small slice of the built-in corpus in its own directory, trains the tiny preset a
few dozen steps (ZeRO 1, every-layer checkpointing, the monitor and evaluation on), resumes
once from a checkpoint, exports to Hugging Face and reloads, and prints one PASS/FAIL line per
check. Imports the whole stack below it: train (make_trainer, the report), after (export),
checkpoint (reading the saved weights), data, model; nothing imports it but the CLI.
"""

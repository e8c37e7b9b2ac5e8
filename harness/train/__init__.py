"""One training run: the DeepSpeed JSON (ds_config.py), the engine (engine.py, init_from.py),
the loop (trainer.py with grad_norms.py and skip_step.py), stopping on signals
(preemption.py), the run directory (run_dir.py), the end-of-run report (report.py), a data
mixture's stream, validation and resume rules (mix_run.py) and the `harness train` command
that puts them together (run.py). May import every layer below:
common, config, data, model, parallel, checkpoint, monitor and callbacks.
"""

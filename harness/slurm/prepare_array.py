"""`harness prepare-data --submit`: the preparation as three Slurm jobs (the work itself:
harness/data/prepare_part.py), rendered from slurm/prepare.sbatch.tmpl into OUT_DIR.prepare/
beside data.out_dir, with the frozen config and the jobs' logs:

    tokenizer.sbatch  prepare-data --stage tokenizer --tasks N   one task
    parts.sbatch      prepare-data --part $SLURM_ARRAY_TASK_ID/N  --array=0-(N-1), afterok:1
    assemble.sbatch   prepare-data                               afterany:2 and afterok:1

The assembly waits for the array to end in any state (afterany): a task that failed leaves
slices undone, which it tokenizes itself, so the result comes either way. Values are quoted as
in sbatch.py (#SBATCH lines and bash each see user values as plain data). A mixture (data.mix)
is spread the same way: its tokenizer and every source's plan first, then the parts over all
the sources' slices (prepare_part.py).
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from harness.common.errors import HarnessError
from harness.config import Config, to_yaml
from harness.config.slurm import SlurmConfig, check_one_line
from harness.data.out_dir import check_out_dir, check_toy_corpus, unwritable
from harness.data.prepare_part import check_tasks
from harness.slurm.sbatch import PLACEHOLDER, REPO, directive_lines, submit
from harness.slurm.submit import absolute_paths

TEMPLATE = REPO / "slurm" / "prepare.sbatch.tmpl"
PREPARE = ("-m", "harness.cli", "prepare-data")
STEPS = ("tokenizer", "parts", "assemble")
WHAT = {"tokenizer": "the plan of slices and the tokenizer, once",
        "parts": "task I of N tokenizes the slices k with k % N == I",
        "assemble": "the slices still missing, then data.out_dir under its lease"}
LOG = {"tokenizer": "tokenizer-%j.out", "parts": "part-%A_%a.out", "assemble": "assemble-%j.out"}


def default_tasks(cfg: SlurmConfig) -> int:
    """The shape the training job asks for: one part per task it would run (a GPU, or a node
    without GPUs), each with slurm.cpus_per_task cores for its tokenizing workers."""
    return cfg.nodes * cfg.tasks_per_node


def job_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f"{out_dir.name}.prepare")


def _directives(cfg: SlurmConfig, directory: str, step: str, tasks: int) -> list[str]:
    opts = [("job-name", f"{cfg.job_name}-prepare-{step}"), ("nodes", 1), ("ntasks", 1),
            ("cpus-per-task", cfg.cpus_per_task), ("time", cfg.time), ("chdir", directory),
            ("output", LOG[step]), ("open-mode", "append")]
    if step == "parts":
        opts.append(("array", f"0-{tasks - 1}"))
    # a requeued task resumes from its completed slices (slurm.requeue, as for training)
    return directive_lines(cfg, opts)


def render_prepare(slurm_cfg: SlurmConfig, directory: str, config_path: str, python: str,
                   step: str, tasks: int) -> str:
    """The batch script of one step (STEPS) of a preparation in `tasks` parts."""
    slurm_cfg.validate()
    check_tasks(tasks)
    for name, value in (("data.out_dir", directory), ("config", config_path),
                        ("python", python)):
        check_one_line(name, value)
    command = " ".join(shlex.quote(a) for a in [python, *PREPARE, "--config", config_path])
    if step == "tokenizer":
        command += f" --stage tokenizer --tasks {tasks}"
    elif step == "parts":  # the one unquoted word: Slurm's task index, a number
        command += f' --part "${{SLURM_ARRAY_TASK_ID}}/{tasks}"'
    values = {"directives": "\n".join(_directives(slurm_cfg, directory, step, tasks)),
              "what": WHAT[step], "step": shlex.quote(step), "command": command}
    return PLACEHOLDER.sub(lambda m: values[m[1]], TEMPLATE.read_text())


def _dependency(step: str, ids: list[str]) -> tuple[str, ...]:
    if step == "tokenizer":
        return ()
    # after a failed step, the jobs waiting on it end rather than pend for ever
    after = f"afterok:{ids[0]}" if step == "parts" else f"afterany:{ids[1]},afterok:{ids[0]}"
    return (f"--dependency={after}", "--kill-on-invalid-dep=yes")


def submit_prepare(cfg: Config, tasks: int | None) -> int:
    """Render the three scripts and the frozen config, sbatch them in order; print the ids."""
    cfg = absolute_paths(cfg)
    cfg.slurm.validate()
    out_dir = Path(cfg.data.out_dir)
    check_out_dir(out_dir)
    check_toy_corpus(cfg.data, out_dir)  # refused here, not in a job's log later
    tasks = default_tasks(cfg.slurm) if tasks is None else tasks
    check_tasks(tasks)
    directory = job_dir(out_dir)
    config = directory / "job_config.yaml"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        config.write_text(to_yaml(cfg))
        scripts = []
        for step in STEPS:
            scripts.append(directory / f"{step}.sbatch")
            scripts[-1].write_text(render_prepare(cfg.slurm, str(directory), str(config),
                                                  sys.executable, step, tasks))
    except OSError as e:
        raise unwritable(out_dir, directory, e) from None
    ids: list[str] = []
    try:
        for step, script in zip(STEPS, scripts):
            ids.append(submit(str(script), _dependency(step, ids)))
    except HarnessError:
        if ids:  # no half of a chain left queued
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60, check=False)
        raise
    print("\n".join(ids))
    print(f"prepare-data --submit: job {ids[0]} (plan and tokenizer), array {ids[1]} "
          f"({tasks} parts), job {ids[2]} (assembles {out_dir}); scripts, config and logs "
          f"in {directory}", file=sys.stderr)
    return 0

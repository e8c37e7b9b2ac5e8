"""The `harness` command: thin argument parsing over the modules that do the work.

Heavy imports (torch, deepspeed) stay inside the commands so that `--help`, config errors
and prepare-data's worker processes start fast.

Errors: the harness's own (HarnessError: bad config, bad input, bad usage, bad flags) print one
line `error: ...` and exit 2. Anything else is a bug: one line naming the exception and the file
its full traceback was written to (under the run directory when the command has one, else a
temporary file), exit 1; HARNESS_DEBUG=1 also prints the traceback. KeyboardInterrupt and
SystemExit pass through.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

from harness.common.errors import HarnessError, check_number

DEBUG_ENV = "HARNESS_DEBUG"
MAX_WORLD_SIZE = 2**20


class _Parser(argparse.ArgumentParser):
    """argparse that raises HarnessError (one `error:` line, exit 2) instead of printing its
    usage block and exiting: bad flags read like every other bad input."""

    argv: list[str] = []  # the command line parse_args was given (for _split_overrides)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        _Parser.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        split = _split_overrides(message, _Parser.argv)
        if split:
            raise HarnessError(split)
        raise HarnessError(f"{self.prog}: {' '.join(message.split())} (`{self.prog} --help` "
                           f"lists the arguments)")


def _split_overrides(message: str, argv: list[str]) -> Optional[str]:
    """argparse takes the overrides (key=value) as one run of positionals: a second run,
    after an option, is 'unrecognized'. Says to keep them together, with the line reordered."""
    prefix = "unrecognized arguments: "
    command = next((a for a in argv if not a.startswith("-")), None)
    if not message.startswith(prefix) or command not in OVERRIDE_COMMANDS:
        return None
    stray = message[len(prefix):].split()
    if not stray or not all("=" in a and not a.startswith("-") for a in stray):
        return None
    overrides = [a for a in argv[argv.index(command) + 1:] if "=" in a and not a.startswith("-")]
    rest = [a for a in argv if a not in overrides]
    return (f"harness {command}: {' '.join(stray)} comes after an option, apart from the "
            f"other overrides: keep the overrides (key=value) together, after the options: "
            f"harness {shlex.join([*rest, *overrides])}")


OVERRIDE_COMMANDS = ("train", "config", "ds-config", "prepare-data", "submit", "plan", "monitor")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name or YAML file (default: tiny)")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved config (every key) and exit")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.micro_batch_size=4")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description="GPT pretraining on DeepSpeed")
    # the deepspeed launcher appends --local_rank=N; it also sets LOCAL_RANK, which we read
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("train", help="train a model (resumes its run directory)"))
    _config_args(sub.add_parser(
        "config", help="print the resolved config: every key, its value (`harness config` "
                       "alone: the tiny preset)"))
    ds = sub.add_parser("ds-config", help="print the generated DeepSpeed JSON")
    _config_args(ds)
    ds.add_argument("--world-size", type=int, default=1,
                    help="ranks in all: tensor- x data-parallel (default 1)")
    ds.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="device the JSON is for (default: this machine's)")
    prep = sub.add_parser("prepare-data", help="tokenize the data.sources into shards")
    _config_args(prep)
    how = prep.add_mutually_exclusive_group()  # spread over a Slurm job array: docs/data.md
    how.add_argument("--submit", action="store_true",
                     help="sbatch three jobs: the tokenizer, an array of --tasks parts, the rest")
    how.add_argument("--part", metavar="I/N", help="tokenize slices k %% N == I only (a task)")
    how.add_argument("--stage", choices=("tokenizer",), help="only the plan and the tokenizer")
    prep.add_argument("--tasks", type=int, help="parts for --submit or --stage (default for "
                                                "--submit: slurm.nodes x tasks per node)")
    submit = sub.add_parser("submit", help="render the sbatch script and submit it")
    _config_args(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    # no abbreviations: --gpus would silently be --gpus-per-node
    plan = sub.add_parser("plan", help="per-GPU memory, estimated time per step; micro batch "
                                       "/ checkpointing that fit", allow_abbrev=False)
    _config_args(plan)
    from harness.plan.flags import add_arguments  # torch-free: the planner loads on use

    add_arguments(plan)
    report = sub.add_parser("report", help="plot and summarise RUN_DIR/metrics.jsonl")
    report.add_argument("run_dir")
    monitor = sub.add_parser("monitor", help="spike monitor tools")
    replay = monitor.add_subparsers(dest="monitor_command", required=True).add_parser(
        "replay", help="run the spike detector over a metrics trace (JSONL or CSV)")
    replay.add_argument("trace")
    _config_args(replay)
    _after_training_args(sub)
    smoke = sub.add_parser("smoke", help="the CI smoke test: train, resume, export and reload a "
                                         "tiny model; one PASS/FAIL line per check")
    smoke.add_argument("--dir", default="build/smoke",
                       help="the smoke's own directory (default build/smoke)")
    smoke.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto (default): cuda when torch sees a GPU, else cpu")
    return parser


def _after_training_args(sub) -> None:
    """eval, sample, export: a trained run (its newest complete checkpoint) or a step dir."""
    what = "run directory (its newest complete checkpoint) or RUN_DIR/checkpoints/stepN"
    ev = sub.add_parser("eval", help="loss, perplexity, bits per byte on text or on the run's "
                                     "validation split (one JSON line)")
    ev.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help=what)
    on = ev.add_mutually_exclusive_group(required=True)
    on.add_argument("--data", nargs="+",
                    help="text files, directories, .jsonl files (the run's text field)")
    on.add_argument("--split", choices=("val", "train"),
                    help="the run's own token shards (data.out_dir in its config.yaml), cut into "
                         "the trainer's windows (all of them; see --trainer-set)")
    ev.add_argument("--trainer-set", action="store_true",
                    help="with --split val: only the trainer's fixed validation set "
                         "(data.eval_sequences), whose loss is its eval/loss")
    ev.add_argument("--max-tokens", type=int, default=None, help="stop after N tokens")
    ev.add_argument("--stride", type=int, default=None,
                    help="tokens scored per window after the first (default block_size: "
                         "lm-evaluation-harness's rolling windows; smaller: more context)")
    ev.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    ev.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    sa = sub.add_parser(
        "sample", help="generate text (no KV cache: each token re-runs the whole context, "
                       "O(T^2) attention per token where a cache costs O(T))")
    sa.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help=what)
    sa.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    sa.add_argument("--max-new-tokens", type=int, default=100)
    sa.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    sa.add_argument("--top-k", type=int, default=0, help="0 keeps every token (default)")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--json", action="store_true", help="one JSON line instead of the text")
    ex = sub.add_parser("export", help="write a Hugging Face model directory (transformers "
                                       "loads it with no code of ours)")
    ex.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help=what)
    ex.add_argument("--to", nargs=2, metavar=("FORMAT", "OUT_DIR"), required=True,
                    help="hf OUT_DIR (a new or empty directory)")


# where an unexpected error's traceback goes: the run directory of the command, once known
_run_dir: list[Path] = []


def _load(args):
    from harness.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.command in ("train", "submit"):
        _run_dir[:] = [Path(cfg.train.run_dir)]
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from harness.train.run import train_process

    return train_process(_load(args))


def cmd_config(args: argparse.Namespace) -> int:
    from harness.config import to_yaml

    sys.stdout.write(to_yaml(_load(args)))
    return 0


def cmd_ds_config(args: argparse.Namespace) -> int:
    from harness.parallel.batch import make_plan
    from harness.train.ds_config import build_ds_config, dumps
    from harness.train.engine import resolve_device

    check_number("--world-size", args.world_size, 1, MAX_WORLD_SIZE, integer=True,
                 fix="the number of data-parallel ranks, e.g. --world-size 8")
    cfg = _load(args)
    device = args.device or resolve_device(cfg)
    sys.stdout.write(dumps(build_ds_config(cfg, make_plan(cfg, args.world_size), device)))
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    if args.submit:
        from harness.slurm.prepare_array import submit_prepare

        return submit_prepare(_load(args), args.tasks)
    if args.part is not None or args.stage or args.tasks is not None:
        from harness.data.prepare_part import main as part_main

        return part_main(_load(args).data, args.part, args.stage, args.tasks)
    from harness.data.prepare import main

    cfg = _load(args)
    if cfg.data.mix:  # one tokenizer, then a directory per source
        from harness.data.mix_prepare import main as mix_main

        return mix_main(cfg.data)
    return main(cfg.data)


def cmd_submit(args: argparse.Namespace) -> int:
    from harness.slurm.submit import submit_job

    return submit_job(_load(args), dry_run=args.dry_run)


def cmd_monitor(args: argparse.Namespace) -> int:
    from harness.monitor.replay import main

    # the config's optim.warmup_steps is a preset's, not the traced run's: unless
    # monitor.trend_after is given, the warm-up's end comes from the trace's logged LR
    given = any(o.startswith("monitor.trend_after=") for o in args.overrides)
    return main(args.trace, _load(args).monitor, warmup_from_trace=not given)


def cmd_report(args: argparse.Namespace) -> int:
    from harness.train.report import main

    _run_dir[:] = [Path(args.run_dir)]
    return main(args.run_dir)


def cmd_plan(args: argparse.Namespace) -> int:
    from harness.plan.command import run

    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from harness.after.evaluate_split import evaluate_split
    from harness.after.evaluate_text import evaluate

    _run_dir[:] = [Path(args.source)]
    if args.split:
        out = evaluate_split(args.source, args.split, args.max_tokens, args.stride,
                             args.batch_size, args.device, args.trainer_set)
    else:
        out = evaluate(args.source, args.data, args.max_tokens, args.stride, args.batch_size,
                       args.device)
    print(json.dumps(out))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from harness.after.sample import sample

    _run_dir[:] = [Path(args.source)]
    out = sample(args.source, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                 args.seed)
    print(json.dumps(out) if args.json else args.prompt + out["completion"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from harness.after.export_hf import export

    fmt, out_dir = args.to
    print(json.dumps(export(args.source, out_dir, fmt)))
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from harness.smoke.command import main

    _run_dir[:] = [Path(args.dir)]
    try:
        return main(args.dir, args.device)
    finally:  # its runs' process group, left before exit as `harness train` leaves it
        _close_process_group()


COMMANDS = {"train": cmd_train, "config": cmd_config, "ds-config": cmd_ds_config,
            "prepare-data": cmd_prepare_data, "submit": cmd_submit, "monitor": cmd_monitor,
            "report": cmd_report, "plan": cmd_plan, "eval": cmd_eval, "sample": cmd_sample,
            "export": cmd_export, "smoke": cmd_smoke}


def _save_traceback(text: str) -> Optional[Path]:
    """The traceback in a new file: under the command's run directory when it exists, else in
    the temporary directory. None when neither can be written."""
    name = (f"traceback-{time.strftime('%Y%m%d-%H%M%S')}-rank{os.environ.get('RANK', '0')}-"
            f"pid{os.getpid()}.txt")
    for folder in [d for d in _run_dir if d.is_dir()]:
        try:
            path = folder / name
            with open(path, "x") as fh:  # never replaces a file
                fh.write(text)
            return path.resolve()
        except OSError:
            pass
    try:
        fd, tmp = tempfile.mkstemp(prefix="harness-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return Path(tmp)
    except OSError:
        return None


def _one_line(text: str, limit: Optional[int] = None) -> str:
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


INTERRUPT_EXIT_CODE = 130  # as harness.train.preemption: the shell code for Ctrl-C (tested equal)


def main(argv: list[str] | None = None) -> int:
    _run_dir.clear()
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if getattr(args, "show_config", False):
            return cmd_config(args)
        return COMMANDS[args.command](args)
    except HarnessError as err:
        # one write: ranks that share a pipe must not interleave their lines
        sys.stderr.write(f"error: {_one_line(str(err))}\n")
        _close_process_group()
        return err.exit_code
    except KeyboardInterrupt:  # before `train` took over Ctrl-C (imports, config, the build)
        sys.stderr.write("interrupted before training started: no step was taken\n")
        return INTERRUPT_EXIT_CODE
    except Exception as err:  # a bug: one line, the traceback kept in a file
        text = traceback.format_exc()
        path = _save_traceback(text)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0") or path is None:
            sys.stderr.write(text)
        where = (f"full traceback in {path}" if path is not None
                 else "the traceback is above (no file could be written)")
        print(f"error: unexpected {type(err).__name__}: {_one_line(str(err), 300)} ({where}; "
              f"{DEBUG_ENV}=1 also prints it; please report it)", file=sys.stderr)
        _close_process_group()
        return 1


_left_group: list[bool] = []  # an error path left a process group (see entry)


def _close_process_group() -> None:
    try:
        from harness.parallel.distributed import close_process_group

        if close_process_group():
            _left_group.append(True)
    except Exception:  # leaving the group must not hide the error being reported
        pass


def entry() -> None:
    """The `harness` command and `python -m harness.cli`: main(), and after an error that
    followed a process group's creation, an exit without the interpreter's teardown. There,
    DeepSpeed's references to the (destroyed) groups and gloo's threads go in no fixed order;
    once, under heavy load, that aborted a process after its error line (SIGABRT, not 2)."""
    code = main()
    if code != 0 and _left_group:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

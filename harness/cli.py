"""The `harness` command: thin argument parsing over the modules that do the work.

Heavy imports (torch, deepspeed) stay inside the commands so that `--help`, config errors
and prepare-data's worker processes start fast.
"""
from __future__ import annotations

import argparse
import logging
import sys

from harness.errors import HarnessError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name or YAML file (default: tiny)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.micro_batch_size=4")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="GPT pretraining on DeepSpeed")
    # the deepspeed launcher appends --local_rank=N; it also sets LOCAL_RANK, which we read
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("train", help="train a model (resumes its run directory)"))
    ds = sub.add_parser("ds-config", help="print the generated DeepSpeed JSON")
    _config_args(ds)
    ds.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default 1)")
    ds.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="device the JSON is for (default: this machine's)")
    _config_args(sub.add_parser("prepare-data", help="tokenize the data.sources into shards"))
    submit = sub.add_parser("submit", help="render the sbatch script and submit it")
    _config_args(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    plan = sub.add_parser("plan", help="per-GPU memory; micro batch / checkpointing that fit")
    _config_args(plan)
    plan.add_argument("--world-size", default="1", help="data-parallel GPUs (default 1)")
    plan.add_argument("--gpu-memory", default="80GB",
                      help="per GPU: 80GB, 80GiB, 24G (default 80GB)")
    plan.add_argument("--target-global-batch", default=None,
                      help="samples per step (default: the config's)")
    plan.add_argument("--top", default="10", help="recommendations shown (default 10)")
    report = sub.add_parser("report", help="plot and summarise RUN_DIR/metrics.jsonl")
    report.add_argument("run_dir")
    monitor = sub.add_parser("monitor", help="spike monitor tools")
    replay = monitor.add_subparsers(dest="monitor_command", required=True).add_parser(
        "replay", help="run the spike detector over a metrics trace (JSONL or CSV)")
    replay.add_argument("trace")
    _config_args(replay)
    return parser


def _load(args):
    from harness.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from harness.run import train_process

    return train_process(_load(args))


def cmd_ds_config(args: argparse.Namespace) -> int:
    from harness.ds_config import build_ds_config, dumps
    from harness.engine import resolve_device
    from harness.plan import make_plan

    cfg = _load(args)
    device = args.device or resolve_device(cfg)
    sys.stdout.write(dumps(build_ds_config(cfg, make_plan(cfg, args.world_size), device)))
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from harness.data.prepare import main

    return main(_load(args).data)


def cmd_submit(args: argparse.Namespace) -> int:
    from harness.submit import submit_job

    return submit_job(_load(args), dry_run=args.dry_run)


def cmd_monitor(args: argparse.Namespace) -> int:
    from harness.monitor.replay import main

    return main(args.trace, _load(args).monitor)


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import main

    return main(args.run_dir)


def cmd_plan(args: argparse.Namespace) -> int:
    from harness.planner import run

    return run(args)


COMMANDS = {"train": cmd_train, "ds-config": cmd_ds_config, "prepare-data": cmd_prepare_data,
            "submit": cmd_submit, "monitor": cmd_monitor, "report": cmd_report,
            "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        from harness.distributed import close_process_group

        close_process_group()
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""The `harness` command: thin argument parsing over the modules that do the work."""
from __future__ import annotations

import argparse
import logging
import sys

from harness.errors import HarnessError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name or YAML file (default: tiny)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.micro_batch_size=4")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("train", help="train a model"))
    ds = sub.add_parser("ds-config", help="print the generated DeepSpeed JSON")
    _config_args(ds)
    ds.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default 1)")
    ds.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="device the JSON is for (default: this machine's)")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from harness.config import load_config
    from harness.run import train

    return train(load_config(args.config, args.overrides))


def cmd_ds_config(args: argparse.Namespace) -> int:
    from harness.config import load_config
    from harness.ds_config import build_ds_config, dumps
    from harness.engine import resolve_device
    from harness.plan import make_plan

    cfg = load_config(args.config, args.overrides)
    device = args.device or resolve_device(cfg)
    sys.stdout.write(dumps(build_ds_config(cfg, make_plan(cfg, args.world_size), device)))
    return 0


COMMANDS = {"train": cmd_train, "ds-config": cmd_ds_config}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())

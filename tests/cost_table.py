"""Measure where the suite's time goes and write the per-file table into tests/README.md.

usage: .venv/bin/python tests/cost_table.py [--json PATH] [--print] [PYTEST ARGS...]
       .venv/bin/python tests/cost_table.py --from-json PATH [--print]

Without --from-json it runs pytest (the whole suite, or PYTEST ARGS: files, -k, -m) with
--durations=0 and HARNESS_TEST_COSTS=PATH (tests/cost_stats.py records each test; default
build/test-costs.json), then renders that JSON. --from-json renders a JSON an earlier run wrote
(.ci/run writes build/test-costs.json) without running anything. --print: print the table
only, leave tests/README.md as it is.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "tests" / "README.md"
START, END = "<!-- cost-table:start -->", "<!-- cost-table:end -->"
INTRO = f"""# Tests

Where the suite's time goes, per file. seconds: setup + call + teardown (a session- or
module-scoped fixture counts in the first test that uses it; on workers, the default
`-n 2`, each test is timed on its own worker, so the total exceeds the wall time, and a
session-scoped fixture is built once per worker). processes: those the pytest
process started (DeepSpeed's gcc/ninja probes at the first engine build included; their own
children, such as ranks and Slurm jobs, not; nor the bad-input battery's forks of a warm
interpreter, tests/forked_cli.py). ranks: started through torchrun or the deepspeed
launcher. engines: DeepSpeed engines built in-process. train: the processes that train
(`harness train`, tests/*_worker.py). `make test` and .ci/run also print the 25 slowest tests;
.ci/run writes build/test-costs.json, from which `--from-json` renders this table.

Regenerate (the whole suite, or only what the pytest arguments select):

    .venv/bin/python tests/cost_table.py [pytest args]
    .venv/bin/python tests/cost_table.py --from-json build/test-costs.json   # a CI run's JSON

{START}
{END}
"""
COLUMNS = ["file", "tests", "seconds", "share", "processes", "ranks", "engines", "train"]


def render(data: dict) -> str:
    files = data["files"]
    total = {k: sum(f[k] for f in files.values())
             for k in ("tests", "seconds", "processes", "ranks", "engines", "train")}
    outcomes: dict[str, int] = {}
    for t in data["tests"].values():
        if t["outcome"]:
            outcomes[t["outcome"]] = outcomes.get(t["outcome"], 0) + 1
    args = shlex.join(data["args"])
    workers = data.get("workers") or 0
    on = f" on {workers} workers (seconds: each test on its worker)" if workers else ""
    lines = [
        f"Measured {data['measured']} on {data['host']} ({data['nproc']} CPUs): "
        f"`pytest {args}`, {data['wall_seconds'] / 60:.1f} min wall{on}, "
        + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())) + ".",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]

    def row(name, f):
        share = f["seconds"] / total["seconds"] * 100 if total["seconds"] else 0.0
        return (f"| {name} | {f['tests']} | {f['seconds']:.1f} | {share:.1f}% | {f['processes']} "
                f"| {f['ranks']} | {f['engines']} | {f['train']} |")

    for name, f in sorted(files.items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(row(name, f))
    lines.append(row("**total**", total))
    return "\n".join(lines)


def write_readme(table: str) -> None:
    text = README.read_text() if README.exists() else INTRO
    if START not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main(argv: list[str]) -> int:
    from_json, out, print_only, pytest_args = None, ROOT / "build" / "test-costs.json", False, []
    it = iter(argv)
    for a in it:  # our own three options; everything else goes to pytest unchanged
        if a == "--from-json":
            from_json = Path(next(it))
        elif a == "--json":
            out = Path(next(it)).resolve()
        elif a == "--print":
            print_only = True
        else:
            pytest_args.append(a)
    rc = 0
    if from_json is None:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
               *pytest_args]
        env = {**os.environ, "HARNESS_TEST_COSTS": str(out)}
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        from_json = out
    table = render(json.loads(from_json.read_text()))
    print(table)
    if not print_only:
        write_readme(table)
        print(f"written into {README.relative_to(ROOT)}")
    return rc  # pytest's: failures still make a table, but not a silent one


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

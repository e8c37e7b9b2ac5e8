"""bench/spikes/spike_suite.py --quick trains 3 tiny runs (stable, a one-step LR x300 crash, and the
crash again under monitor.action=rollback) in a process of its own; its tables must be printed and
well-formed and its JSON must hold every number the tables show. --rescore of that JSON (no
training) must print the same detection tables; --record anneal_to_0 adds one stable run whose
cosine ends at LR 0 and keeps the stored runs."""
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
DETECTORS = ["ours", "ours-alarm", "ours-loss", "fixed", "zclip", "olmo", "megatron", "lightning"]
# engines built earlier in this pytest process exported their rank and store port
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def _table(lines: list[str], title: str) -> list[list[str]]:
    """The rows of the table printed under the line starting with `title`: a header, a rule
    of dashes with one run per column, then rows with exactly that many cells."""
    start = next(i for i, ln in enumerate(lines) if ln.startswith(title))
    header, rule = lines[start + 1].split(), lines[start + 2].split()
    assert rule and all(set(r) == {"-"} for r in rule)
    rows = []
    for ln in lines[start + 3:]:
        if not ln.strip():
            break
        cells = ln.split()
        assert len(cells) == len(rule), (title, ln)
        rows.append(cells)
    assert len(header) >= 2 and rows
    return rows


def suite(args: list[str], tmp_path: Path):
    """`python bench/spikes/spike_suite.py ARGS` as a process of its own, forked from a warm
    interpreter (tests/forked_cli.py: the script as Python runs it, less the imports)."""
    import forked_cli

    code, stdout, stderr = forked_cli.run_script(
        "bench/spikes/spike_suite.py", args, ROOT, dict(ENV, OMP_NUM_THREADS="1"), tmp_path,
        timeout=180)
    return SimpleNamespace(code=code, stdout=stdout, stderr=stderr)


@pytest.mark.slow
def test_spike_suite_quick(tmp_path):
    out = tmp_path / "spikes.json"
    proc = suite(["--quick", "--out", str(out),
         "--workdir", str(tmp_path / "work")], tmp_path)
    assert proc.code == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()

    for title in ("detection at the published settings", "at a matched false-alarm rate"):
        rows = _table(lines, title)
        assert [r[0] for r in rows] == DETECTORS
        for r in rows:
            fa = float(r[-1])
            assert fa >= 0 and all(c == "-" or 0.0 <= float(c) <= 1.0 for c in r[2:6])
    per_scenario = _table(lines, "lead in steps per spike")
    assert [r[0] for r in per_scenario] == ["stable", "lr_crash"]
    _table(lines, "rollback:")
    assert any(ln.startswith("monitor overhead:") for ln in lines)

    result = json.loads(out.read_text())
    assert set(result["detectors"]) == set(DETECTORS)
    ours = result["detectors"]["ours"]
    assert ours["sweep"]["1.0"]["stable_steps"] > 0
    assert [r["scenario"] for r in result["runs"]] == ["stable", "lr_crash"]
    crash = result["runs"][1]
    assert crash["gt"], "the LR x300 step must damage the held-out loss"
    # the update norm of the crash step is known before any loss shows the damage
    assert ours["sweep"]["1.0"]["recall_ahead"] == 1.0
    rb = result["rollback"]
    assert all(math.isfinite(rb[k]) for k in ("clean", "unprotected", "rollback"))
    assert rb["rollbacks"], "the rollback run must have rolled back"
    assert result["overhead"]["ratio"] > 0

    # the same traces replayed from the JSON: the same tables, without training
    again = suite(["--rescore", str(out)], tmp_path)
    assert again.code == 0, again.stderr[-3000:]
    relines = again.stdout.splitlines()
    for title in ("detection at the published settings", "at a matched false-alarm rate",
                  "lead in steps per spike", "real stable log"):
        assert _table(relines, title) == _table(lines, title)
    assert any("rescored from" in ln for ln in relines)

    # one scenario recorded later and merged in (--record): only its run trains; the stored
    # runs stay as they were, and the anneal-to-0 run counts as a stable, held-out run
    merged = tmp_path / "merged.json"
    rec = suite(["--rescore", str(out), "--record", "anneal_to_0",
         "--out", str(merged), "--workdir", str(tmp_path / "work")], tmp_path)
    assert rec.code == 0, rec.stderr[-3000:]
    mlines = rec.stdout.splitlines()
    end = _table(mlines, "end of schedule")
    assert [r[0] for r in end] == DETECTORS * 2  # published, then matched
    assert any("True on the 1 runs recorded now" in ln for ln in mlines)
    both = json.loads(merged.read_text())
    assert [r["scenario"] for r in both["runs"]] == ["stable", "lr_crash", "anneal_to_0"]
    assert both["runs"][:2] == result["runs"][:2]  # kept as recorded
    lr = [row[both["trace_keys"].index("optim/lr")] for row in both["runs"][2]["trace"]]
    assert lr[-1] < 0.01 * max(lr)  # the cosine ends at LR 0, not at the 10% floor
    assert both["rollback"] == result["rollback"]
    # quick's stable seed 1 is a tuning run: the anneal run is the held-out FA denominator
    assert result["scored_part"].startswith("all runs")
    assert both["scored_part"] == "held-out part"
    assert both["detectors"]["ours"]["sweep"]["1.0"]["stable_steps"] == 60 - 30 + 1

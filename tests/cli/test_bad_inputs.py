"""The bad-input battery: every case in tests/bad_inputs/*.py, table-driven.

A case ends with its promised exit code and one line naming the key or file and the fix, no
traceback, and changes no file it should not. Fast cases run in-process through
harness.cli.main; `process` cases in a process of their own (real exit codes, a fresh
DeepSpeed): forked from a warm interpreter (tests/forked_cli.py), or, when a case signals it
while it runs, `python -m harness.cli`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import pkgutil
import signal
import subprocess
import sys
from pathlib import Path

import bad_inputs
import pytest
from bad_inputs import Case
from engine_utils import child_env


def _all_cases() -> list[Case]:
    cases = []
    for mod in pkgutil.iter_modules(bad_inputs.__path__):
        cases += importlib.import_module(f"bad_inputs.{mod.name}").CASES
    return cases


CASES = _all_cases()


def _params():
    for case in CASES:
        marks = [pytest.mark.slow] if case.slow else []
        yield pytest.param(case, id=case.id, marks=marks)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


class CaseTimeout(BaseException):
    """Past a case's timeout. A BaseException: the CLI's `except Exception` (the bug path)
    must not turn a hang into an ordinary exit code."""


@contextlib.contextmanager
def _deadline(seconds):
    """In-process cases: SIGALRM interrupts a Python loop that hangs (a YAML alias bomb)."""
    if not seconds:
        yield
        return

    def fire(*_):
        raise CaseTimeout(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run(case: Case, tmp: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    if case.process:
        env = child_env(**{k: v.replace("{tmp}", str(tmp)) for k, v in case.env.items()})
        if case.during is None:  # a fork of a warm interpreter: the same process, 4 s sooner
            import forked_cli  # imports DeepSpeed: only when a process case runs

            code, out, err = forked_cli.run(argv, tmp, env, timeout=case.timeout or 600)
            assert code is not None, f"still running after {case.timeout or 600} s: a hang"
            return code, out, err
        with subprocess.Popen([sys.executable, "-m", "harness.cli", *argv], cwd=tmp, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            try:
                if case.during is not None:
                    case.during(proc, tmp)
                out, err = proc.communicate(timeout=case.timeout or 600)
            finally:
                if proc.poll() is None:
                    proc.kill()
        return proc.returncode, out, err
    from harness.cli import main

    monkeypatch.chdir(tmp)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.replace("{tmp}", str(tmp)))
    with _deadline(case.timeout):
        code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_battery_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 200


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case: Case, tmp_path, capsys, monkeypatch):
    if case.setup is not None:
        case.setup(tmp_path)
    before = {p: _digest(tmp_path / p) for p in case.unchanged}
    code, out, err = _run(case, tmp_path, capsys, monkeypatch)
    assert code == case.exit_code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    if case.exit_code == 2:
        # log lines (INFO/WARNING) may precede it; the error itself is one line
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, err[-3000:]
        for word in case.words:
            assert word in lines[0], (word, lines[0])
    assert {p: _digest(tmp_path / p) for p in case.unchanged} == before
    if case.check is not None:
        case.check(tmp_path, out, err)

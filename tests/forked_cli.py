"""A `harness` command as a process forked from a warm interpreter (Python's forkserver).

A damaged-checkpoint case's `python -m harness.cli train` spends most of its 5 s importing:
torch, DeepSpeed, the harness, torch._dynamo (which torch.optim imports at its first
optimizer) and matplotlib (report.png). The forkserver imports them once (PRELOAD); each
command is then a fork of that interpreter: a process of its own, with no process group and no
DeepSpeed state (the server never builds an engine), its own exit code, stdout and stderr, and
the ending `harness` itself has (harness.cli.entry: atexit handlers, or os._exit after an
error that followed a process group). Cases that signal the process while it runs still start
`python -m harness.cli` with subprocess: a fork is not what a user's shell starts.

`run_script` does the same for a script (the bench scripts' --quick runs): `python SCRIPT ARGS`
less the interpreter's start, the script run as __main__ with its own directory first on
sys.path, as Python runs it.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import sys
from pathlib import Path

# importable from the server's own sys.path (Python 3.11's forkserver does not take the
# parent's: a module of tests/ would fail to preload, silently, and every fork import it all)
PRELOAD = ["torch._dynamo", "matplotlib.backends.backend_agg", "matplotlib.figure", "deepspeed",
           "harness.train.run", "harness.cli"]
_context = None


def _forks():
    global _context
    if _context is None:
        import torch

        # the accelerator harness.train.engine pins before DeepSpeed's first import (here and, from
        # this environment, in the server)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _enter(cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the fork: the command's directory, environment and output files."""
    import torch

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # read at import otherwise
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)


def _case(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the fork: `harness ARGV`, ended as harness.cli.entry ends."""
    import harness.cli

    _enter(cwd, env, out, err)
    code = harness.cli.main(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0 or not harness.cli._left_group:  # as harness.cli.entry ends
        atexit._run_exitfuncs()
    os._exit(code)


def _script(path: str, args: list[str], cwd: str, env: dict[str, str], out: str,
            err: str) -> None:
    """In the fork: `python PATH ARGS` from its first line, ended as the interpreter ends."""
    import runpy
    import traceback

    _enter(cwd, env, out, err)
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: B036 (what the interpreter prints for an uncaught one)
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def _wait(target, args: tuple, outputs: Path, timeout: float) -> tuple[int, str, str]:
    out, err = outputs / ".case-stdout", outputs / ".case-stderr"
    proc = _forks().Process(target=target, args=(*args, str(out), str(err)))
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    texts = [p.read_text(errors="replace") if p.exists() else "" for p in (out, err)]
    for p in (out, err):
        p.unlink(missing_ok=True)
    return proc.exitcode, texts[0], texts[1]


def run(argv: list[str], cwd: Path, env: dict[str, str],
        timeout: float = 600) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `harness ARGV` run in `cwd` with exactly `env`."""
    return _wait(_case, (argv, str(cwd), env), cwd, timeout)


def run_script(script: str, args: list[str], cwd: Path, env: dict[str, str], outputs: Path,
               timeout: float = 600) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python SCRIPT ARGS` run in `cwd` with exactly `env`;
    the output files go to `outputs` (a temporary directory, not the repository)."""
    return _wait(_script, (script, args, str(cwd), env), outputs, timeout)

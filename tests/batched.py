"""Many cases in one launch of the ranks: the tests' side and the workers' side.

Starting 2 ranks costs ~8-10 s on a 2-core machine (each imports torch and DeepSpeed), far more
than training one of the tests' tiny configs. So a test module launches its ranks once, and the
worker runs every case in turn in the same processes (one engine per case, the process group
kept), writing each case's results into OUT/<case id>/; the parametrized tests only read them.

A case's failure still fails that case's test, with its own traceback: the worker writes the
traceback into OUT/<case>/error-rankR.txt and ends its process (a rank left alone would wait
in a collective), torchrun ends the others, and `launch` starts the ranks again for the cases
not yet run. A case that hangs is ended after `case_timeout` s and reported the same way.

The cases run in the order given (a dict keeps it), a relaunch going on with the ones after
the case that failed, in fresh processes: a test that needs runs between two cases (a run
stopped and its resume, with other runs between them overwriting what the first left in the
processes) gets them either way.

A case may be meant to end the processes (a refused start: sys.exit(2)): case_dir records
the SystemExit's code in OUT/<case>/exit-rankR.txt and exits with it; Outcome.exited(case)
gives the launch's exit code and output to check, and Outcome.dir fails for such a case.

Worker side:   for case, spec in read_cases(spec_file).items():
                   with case_dir(out, case, env_rank()) as d: ...
Test side:     outcome = launch(lambda spec_file: argv, out, {id: spec}, env); outcome.dir(id)
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest

CASES_FILE = "cases.json"


# ---- in the worker -------------------------------------------------------------------------------

def read_cases(spec_file: str | Path) -> dict:
    """{case id: spec}, in the order they run."""
    return json.loads(Path(spec_file).read_text())


@contextlib.contextmanager
def case_dir(out: Path, case: str, rank: int):
    """Marks the case started, yields its directory, marks it done; on an exception writes the
    traceback and ends this process (exit 1), so that no rank waits on it in a collective; on
    SystemExit (a refusal) records its code and exits with it."""
    d = Path(out) / case
    d.mkdir(parents=True, exist_ok=True)
    (d / f"started-rank{rank}").touch()
    try:
        yield d
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        (d / f"exit-rank{rank}.txt").write_text(str(code))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except BaseException:  # noqa: B902 (KeyboardInterrupt too: the case did not finish)
        (d / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    (d / f"done-rank{rank}").touch()


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_cases(argv: list[str], train) -> None:
    """A worker's cases: `--cases SPEC.json OUT` runs train(OUT/<case>, overrides) for each case
    in turn (the previous case's engine collected first); `OUT ARGS...` runs train(OUT, ARGS)
    once (the old usage)."""
    if argv[0] == "--cases":
        out = Path(argv[2])
        for case, overrides in read_cases(argv[1]).items():
            with case_dir(out, case, env_rank()) as d:
                train(d, overrides)
            gc.collect()  # the case's engine, before the next one's
    else:
        train(Path(argv[0]), argv[1:])


# ---- in the test ---------------------------------------------------------------------------------

class Outcome:
    """What one launch (or its relaunches) left: the cases launched; per case that did not
    finish on every rank, why (failures), or, for one that ended the processes through
    SystemExit, the exit code and output of the launch it ended (exits)."""

    def __init__(self, out: Path, cases: list[str], failures: dict[str, str],
                 exits: dict[str, tuple[int | None, str]], output: str):
        self.out, self.cases, self.failures, self.exits = out, cases, failures, exits
        self.output = output

    def ok(self, case: str) -> bool:
        """Whether the case was launched and finished on every rank."""
        return case in self.cases and case not in self.failures and case not in self.exits

    def _require_launched(self, case: str) -> None:
        if case not in self.cases:
            pytest.fail(f"case {case} was not in the launch (its fixture left it out: a case "
                        f"it depends on failed)", pytrace=False)
        if case in self.failures:
            pytest.fail(f"case {case}: {self.failures[case]}", pytrace=False)

    def dir(self, case: str) -> Path:
        """The case's directory; fails the calling test with the case's own error if it failed
        (or ended the processes, or was not launched)."""
        self._require_launched(case)
        if case in self.exits:
            code, output = self.exits[case]
            pytest.fail(f"case {case} ended the processes (launch exit code {code})\n"
                        f"--- launch output, last 3000 characters:\n{output[-3000:]}",
                        pytrace=False)
        return self.out / case

    def exited(self, case: str) -> tuple[int | None, str]:
        """(exit code, output) of the launch that case ended through SystemExit; fails the
        calling test if it failed otherwise (its traceback) or finished."""
        self._require_launched(case)
        if case not in self.exits:
            pytest.fail(f"case {case} finished on every rank: no exit", pytrace=False)
        return self.exits[case]


def _state(out: Path, case: str, nproc: int) -> str:
    d = out / case
    if all((d / f"done-rank{r}").exists() for r in range(nproc)):
        return "done"
    if list(d.glob("error-rank*.txt")):
        return "error"
    if list(d.glob("exit-rank*.txt")):
        return "exited"
    if list(d.glob("started-rank*")):
        return "started"
    return "pending"


def _errors(out: Path, case: str) -> str:
    return "\n".join(f"{p.name}:\n{p.read_text()}" for p in sorted((out / case).glob("error-*")))


def _run(cmd: list[str], env: dict, watch, case_timeout: float,
         start_timeout: float) -> tuple[int | None, str, str | None]:
    """Run the launcher; (exit code, output, the case that hung or None). On a hang, SIGTERM
    (torchrun and the deepspeed launcher pass it on to the ranks), then SIGKILL."""
    hung = None
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        current, since = None, time.monotonic()
        while proc.poll() is None:
            running = watch()
            if running != current:
                current, since = running, time.monotonic()
            limit = start_timeout if current is None else case_timeout
            if time.monotonic() - since > limit:
                hung = current or "(start-up)"
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                break
            time.sleep(0.1)
        log.seek(0)
        return proc.returncode, log.read(), hung


def launch(command, out: Path, cases: dict[str, object], env: dict, nproc: int = 2,
           case_timeout: float = 300, start_timeout: float = 300) -> Outcome:
    """command(spec_file) -> the launcher's argv, which runs the cases in spec_file (JSON
    {id: spec}) and marks them through `case_dir`. Relaunched for the cases after one that
    failed (or exited), until every case is done, failed or exited. Outcome.output: every
    launch's output; Outcome.launches: how many launches that took."""
    out.mkdir(parents=True, exist_ok=True)
    pending, failures, exits, outputs = dict(cases), {}, {}, []
    attempt = 0
    while pending:
        attempt += 1
        spec_file = out / f"cases-{attempt}.json"
        spec_file.write_text(json.dumps(pending))
        ids = list(pending)

        def running():
            started = [c for c in ids if _state(out, c, nproc) == "started"]
            return started[-1] if started else None

        code, output, hung = _run(command(spec_file), env, running, case_timeout, start_timeout)
        outputs.append(output)
        tail = f"\n--- launch output (exit {code}), last 3000 characters:\n{output[-3000:]}"
        progressed = False
        for case in ids:
            state = _state(out, case, nproc)
            if state == "done":
                progressed = True
                del pending[case]
            elif state == "error":
                failures[case] = _errors(out, case) + tail
                progressed = True
                del pending[case]
            elif state == "exited":
                exits[case] = (code, output)
                progressed = True
                del pending[case]
            elif state == "started" or case == hung:
                why = (f"hung for {case_timeout:g} s (a rank waiting in a collective?)"
                       if case == hung else f"exit code {code}")
                failures[case] = f"{why} while this case ran{tail}"
                progressed = True
                del pending[case]
        if pending and (code == 0 or not progressed):  # nothing more a relaunch would fix
            why = "not run" if code == 0 else f"the ranks never started a case (exit {code})"
            for case in pending:
                failures[case] = why + tail
            break
    outcome = Outcome(out, list(cases), failures, exits, "".join(outputs))
    outcome.launches = attempt  # the launcher's starts, relaunches included
    outcome.nproc = nproc
    return outcome


def launched_params(request, test_name: str) -> list[dict]:
    """The parameters of the selected tests named test_name in the requesting module, so that
    a module fixture launches only the cases that the selection will read."""
    return [item.callspec.params for item in request.session.items
            if item.module is request.module and item.originalname == test_name
            and hasattr(item, "callspec")]


def selected(request, test_name: str) -> bool:
    """Whether the selection runs a test named test_name of the requesting module."""
    return any(item.module is request.module and item.originalname == test_name
               for item in request.session.items)

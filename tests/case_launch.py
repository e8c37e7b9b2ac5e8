"""Many cases in one launch (tests/tp_cases_worker.py, tests/reshard_worker.py --cases): the
process start (torch + DeepSpeed imports, ~8-10 s per rank on 2 cores) and the rendezvous are
paid once per launch instead of once per case.

The worker runs SPEC.json's cases in order; after each case every rank writes OUT.doneR, and a
case that raises writes OUT.errorR.txt (its traceback) and ends the launch. check(name), called
by the test of that case, fails with that case's own traceback, or, for a case the launch never
reached, with the name and traceback of the case that ended it.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from engine_utils import child_env


def done(out, rank: int) -> Path:
    return Path(f"{out}.done{rank}")


def error_files(out) -> list[Path]:
    out = Path(out)
    return sorted(out.parent.glob(f"{out.name}.error*.txt"))


class Launch:
    def __init__(self, cmd: list[str], spec: Path, cases: list[dict], nproc: int,
                 timeout: float = 600):
        spec.write_text(json.dumps(cases))
        self.cases = {c["name"]: c for c in cases}
        self.order = [c["name"] for c in cases]
        self.nproc = nproc
        try:
            proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True,
                                  timeout=timeout, check=False)
            self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            def text(b):
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

            self.returncode = None
            self.stdout, self.stderr = text(exc.stdout), text(exc.stderr)

    def tail(self) -> str:
        return (f"launch exit code {self.returncode} (None: timed out)\n"
                f"{self.stdout[-3000:]}{self.stderr[-3000:]}")

    def finished(self, name: str) -> bool:
        out = self.cases[name]["out"]
        return all(done(out, r).is_file() for r in range(self.nproc))

    def check(self, name: str) -> None:
        """Fails unless case `name` ran to its end on every rank."""
        if name not in self.cases:
            raise AssertionError(f"case {name} was not in the launch (its fixture left it out: "
                                 f"a case it depends on failed)\n{self.tail()}")
        out = self.cases[name]["out"]
        errors = error_files(out)
        if errors:
            raise AssertionError("\n".join(p.read_text() for p in errors))
        if self.finished(name):
            return
        for other in self.order:  # the first case that did not finish ended the launch
            if other == name:
                break
            if not self.finished(other):
                why = "\n".join(p.read_text() for p in error_files(self.cases[other]["out"]))
                raise AssertionError(f"case {name} not run: the launch ended in case {other}:\n"
                                     f"{why or self.tail()}")
        raise AssertionError(f"case {name} did not finish on every rank:\n{self.tail()}")

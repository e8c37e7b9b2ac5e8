"""One writer per directory: the lease a run directory's writer holds (and prepare-data's, on
the shards directory it builds).

A lease is two files beside each other:
    NAME.lock   the file the holder flock()s, open for as long as it holds the lease; its
                inode never changes while held (a record replaced by rename would move a lock
                taken on it to a file nobody opens any more)
    NAME        the holder's record, JSON, replaced atomically (tmp + rename), so a reader on
                another node never sees it half-written: pid, host, Slurm job id (or null),
                start time, heartbeat time (refreshed every HEARTBEAT_S by one daemon thread),
                and a random token naming this holder
For a run directory NAME is RUN_DIR/.harness-lease.

flock is authoritative where the filesystem honours it (one host always; NFSv4, Lustre and
GPFS across nodes when mounted so): a lock held is a live holder. Where it is not propagated
across nodes, the record decides: a heartbeat younger than STALE_AFTER_S written on another
host is a live holder too. A lease left by a dead holder (its lock free, on this host; or its
heartbeat stale) is taken over with one warning. A holder of the same Slurm job (a requeue) is
this run's previous incarnation: it is waited for (up to STALE_AFTER_S), then taken over.
Anything else refuses with one line naming the holder and how to stop it (HarnessError, exit 2).

The holder removes both files when it releases (atexit too); a taker checks, once it has the
lock, that the path still names the inode it locked, so a release racing a take never leaves
two holders.

Layer: the run directory's. Imports the standard library and harness.common.errors only (no torch:
`harness submit` checks leases on a login node). Collectives are passed in, never imported.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from harness.common.errors import HarnessError

log = logging.getLogger("harness")

RUN_LEASE = ".harness-lease"  # in the run directory (run_dir.py lets it be there)
LOCK_SUFFIX = ".lock"
# module constants, not config: tests shrink them; a cluster has no reason to tune them
HEARTBEAT_S = 30.0
STALE_AFTER_S = 3 * HEARTBEAT_S  # three missed beats: the holder is gone (or its node is)
LOCK_RETRY_S = 1.0  # a lock seen held this briefly may be a check's test lock, not a holder
POLL_S = 0.05


def host() -> str:
    return socket.gethostname()


def job_id() -> Optional[str]:
    return os.environ.get("SLURM_JOB_ID") or None


# ---- the record ------------------------------------------------------------------------------
@dataclass
class Holder:
    pid: int
    host: str
    job: Optional[str]
    started: str  # local time, for people
    heartbeat: float  # time.time() of the last refresh
    token: str

    def describe(self, now: float) -> str:
        job = f" (Slurm job {self.job})" if self.job else ""
        return (f"pid {self.pid} on host {self.host}{job}, started {self.started}, last "
                f"heartbeat {max(0.0, now - self.heartbeat):.0f} s ago")

    def how_to_stop(self) -> str:
        kill = f"`kill {self.pid}` on {self.host}"
        return f"`scancel {self.job}`, or {kill}" if self.job else kill


def _read(record: Path) -> Optional[Holder]:
    """The record, or None when there is none (or it is not one: a holder that has not written
    it yet, or someone's stray file)."""
    try:
        data = json.loads(record.read_text())
        return Holder(int(data["pid"]), str(data["host"]), data["job"] and str(data["job"]),
                      str(data["started"]), float(data["heartbeat"]), str(data["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(record: Path, holder: Holder) -> None:
    tmp = record.with_name(f"{record.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(vars(holder), indent=1) + "\n")
    os.replace(tmp, record)


# ---- the lock --------------------------------------------------------------------------------
def _lock(path: Path, create: bool) -> tuple[Optional[int], bool]:
    """(fd holding the lock, or None; whether someone else holds it)."""
    try:
        fd = os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o644)
    except FileNotFoundError:
        if create:
            raise
        return None, False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None, True
        raise
    try:  # released (and unlinked) between our open and our lock: that inode is nobody's now
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return _lock(path, create)
    return fd, False


def _verdict(holder: Optional[Holder], locked: bool, now: float) -> str:
    """take | wait (this job's previous incarnation) | refuse."""
    if holder is None:
        return "refuse" if locked else "take"
    same_job = holder.job is not None and holder.job == job_id()
    if locked:
        return "wait" if same_job else "refuse"
    if holder.host == host() or now - holder.heartbeat >= STALE_AFTER_S:
        return "take"  # its lock is free on this host, or its heartbeat stopped
    return "wait" if same_job else "refuse"  # another host's, fresh: its flock may not reach us


def refusal(key: str, directory: Path, holder: Optional[Holder], record: Path,
            alternative: str) -> HarnessError:
    now = time.time()
    if holder is None:
        return HarnessError(
            f"{key}={directory} is locked by a process that wrote no lease record "
            f"({record}{LOCK_SUFFIX} is locked, {record.name} is missing): `fuser "
            f"{record}{LOCK_SUFFIX}` shows it; stop it, or {alternative}")
    stale_in = STALE_AFTER_S - (now - holder.heartbeat)
    gone = (f"; if that process is gone, its lease expires in {stale_in:.0f} s"
            if holder.host != host() and stale_in > 0 else "")
    return HarnessError(f"{key}={directory} is in use by another writer: {holder.describe(now)}"
                        f"{gone}: wait for it to end or stop it ({holder.how_to_stop()}), or "
                        f"{alternative}")


# ---- holding ---------------------------------------------------------------------------------
class Lease:
    """A lease this process holds. release() is idempotent and safe in finally/atexit paths."""

    def __init__(self, record: Path, fd: int, holder: Holder, made_dir: Optional[Path]):
        self.record, self.fd, self.holder, self.made_dir = record, fd, holder, made_dir
        self.lost = False

    @property
    def token(self) -> str:
        return self.holder.token

    def beat(self) -> None:
        if self.fd is None or self.lost:
            return
        found = _read(self.record)
        if found is not None and found.token != self.token:
            # someone judged us gone and took over: say so once; our writes are no longer safe
            self.lost = True
            log.error("%s: the lease of this run was taken over by %s: another writer is in "
                      "this directory; stop one of them", self.record.parent,
                      found.describe(time.time()))
            return
        self.holder.heartbeat = time.time()
        try:
            _write(self.record, self.holder)
        except OSError:  # the directory went away (a test's tmp dir): nothing left to guard
            pass

    def release(self) -> None:
        if self.fd is None:
            return
        _held.pop(self.record, None)
        try:
            found = _read(self.record)
            if found is None or found.token == self.token:  # never another holder's record
                self.record.unlink(missing_ok=True)
                Path(f"{self.record}{LOCK_SUFFIX}").unlink(missing_ok=True)
            if self.made_dir is not None:
                self.made_dir.rmdir()  # made by take() and left empty: as before the run
        except OSError:
            pass
        finally:
            os.close(self.fd)  # drops the lock (after the unlink: see _lock's inode check)
            self.fd = None


_held: dict[Path, Lease] = {}  # this process's leases, by record path
_beating = threading.Event()


def _heartbeat_loop() -> None:
    while True:
        # wakes often and beats when due: HEARTBEAT_S may change after the thread started
        time.sleep(min(HEARTBEAT_S, 1.0))
        for lease in list(_held.values()):
            if lease.holder.pid == os.getpid() and \
                    time.time() - lease.holder.heartbeat >= HEARTBEAT_S:  # not a fork's copy
                try:
                    lease.beat()
                except Exception as e:  # the thread must outlive one bad beat
                    log.debug("lease heartbeat of %s failed: %s", lease.record, e)


def _start_heartbeat() -> None:
    if not _beating.is_set():
        _beating.set()
        threading.Thread(target=_heartbeat_loop, name="harness-lease-heartbeat",
                         daemon=True).start()
        atexit.register(release_all)


def release_all() -> None:
    for lease in list(_held.values()):
        if lease.holder.pid == os.getpid():
            lease.release()


def take(record: Path, key: str, directory: Path, alternative: str) -> Lease:
    """Hold the lease `record` guards for `key`=`directory`, or raise the refusal. Held by this
    process already: that lease (a second make_trainer in one process is the same writer)."""
    record = Path(os.path.abspath(record))
    mine = _held.get(record)
    if mine is not None and mine.fd is not None and mine.holder.pid == os.getpid():
        return mine
    made = None
    if not record.parent.exists():
        record.parent.mkdir(parents=True, exist_ok=True)
        made = record.parent
    start = time.monotonic()
    while True:
        fd, locked = _lock(Path(f"{record}{LOCK_SUFFIX}"), create=True)
        holder = _read(record)
        verdict = _verdict(holder, locked, time.time())
        if verdict == "take":
            return _hold(record, fd, holder, key, directory, made)
        if fd is not None:
            os.close(fd)
        waited = time.monotonic() - start
        # this job's previous incarnation: until its heartbeat would have gone stale
        if waited < (STALE_AFTER_S + 1.0 if verdict == "wait" else LOCK_RETRY_S):
            time.sleep(POLL_S)
            continue
        if made is not None:
            try:
                made.rmdir()
            except OSError:
                pass
        raise refusal(key, directory, holder, record, alternative)


def _hold(record: Path, fd: int, previous: Optional[Holder], key: str, directory: Path,
          made: Optional[Path]) -> Lease:
    now = time.time()
    holder = Holder(os.getpid(), host(), job_id(), time.strftime("%Y-%m-%d %H:%M:%S %z"), now,
                    secrets.token_hex(8))
    try:
        _write(record, holder)
    except OSError:
        os.close(fd)
        raise
    lease = Lease(record, fd, holder, made)
    _held[record] = lease
    _start_heartbeat()
    if previous is not None and (previous.pid, previous.host) != (holder.pid, holder.host):
        same_job = previous.job is not None and previous.job == holder.job
        why = ("its lock is free" if previous.host == holder.host else
               f"no heartbeat for {now - previous.heartbeat:.0f} s")
        # a requeue of the same job finding its own lease is routine; anyone else's is news
        (log.info if same_job else log.warning)(
            "%s=%s: took over the lease left by %s: that writer is gone (%s)", key, directory,
            previous.describe(now), why)
    return lease


# ---- checking (not holding) ------------------------------------------------------------------
def check(record: Path, key: str, directory: Path, alternative: str) -> None:
    """Refuse when a live writer of another job holds the lease; take nothing, create nothing
    (`harness submit` on a login node; a job's other ranks before rank 0 holds it)."""
    record = Path(os.path.abspath(record))
    start = time.monotonic()
    while True:
        fd, locked = _lock(Path(f"{record}{LOCK_SUFFIX}"), create=False)
        if fd is not None:
            os.close(fd)  # a test lock only
        holder = _read(record)
        mine = _held.get(record)
        if _verdict(holder, locked, time.time()) != "refuse" or (
                mine is not None and holder is not None and mine.token == holder.token):
            return
        if time.monotonic() - start >= LOCK_RETRY_S:
            raise refusal(key, directory, holder, record, alternative)
        time.sleep(POLL_S)


def record_token(record: Path) -> Optional[str]:
    """The token in the lease record, or None (no record)."""
    found = _read(Path(os.path.abspath(record)))
    return found.token if found is not None else None


def held_token(record: Path) -> Optional[str]:
    """This process's token for `record`, or None when it does not hold it."""
    mine = _held.get(Path(os.path.abspath(record)))
    return mine.token if mine is not None and mine.fd is not None else None


def release(record: Path) -> None:
    """Release this process's lease on `record`, if it holds one."""
    mine = _held.get(Path(os.path.abspath(record)))
    if mine is not None:
        mine.release()


def same_holder(comm: Any, rank: int, record: Path) -> Optional[str]:
    """Collective (every rank, every world size): rank 0's token broadcast; each rank compares
    the record it sees. This rank's problem, or None."""
    token = comm.broadcast_object(held_token(record) if rank == 0 else None)
    seen = record_token(record)
    if token is None:
        return f"rank 0 holds no lease on {record.parent}"
    if seen is None:
        return (f"rank {rank} on {host()} finds no lease record {record} (rank 0 holds one): "
                f"is the directory on a filesystem every node shares?")
    if seen != token:
        other = _read(record)
        who = other.describe(time.time()) if other is not None else "unknown"
        return f"rank {rank} on {host()} finds the lease {record} held by another writer ({who})"
    return None


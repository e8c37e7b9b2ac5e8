"""Checkpoint checksums, and the collective verification of a step directory (see
harness/checkpoint/checkpointer.py's docstring for what is checked, when, and why this way)."""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from harness.common.durable import fsync_path
from harness.common.errors import HarnessError
from harness.config.checkpoint import META
from harness.parallel.collectives import Collectives

log = logging.getLogger("harness")


CHECKSUM = "sha256/64MiB"  # SHA-256 of each 64 MiB chunk of each file (and the file's size)
CHUNK = 64 << 20
_BLOCK = 8 << 20  # read buffer per hashing thread
MAX_THREADS = 8
SUMS = ".sums-rank{}.json"  # one rank's checksums of the files it wrote, merged by rank 0
SET_ASIDE = "corrupt-"  # prefix of a step directory that failed verification
_STEP_DIR = re.compile(r"step\d+")
_MISMATCH, _UNREADABLE = 1, 2  # per-file verdicts, combined by an all-reduce (max)



def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Step directories with meta.json, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step*") if (p / META).is_file())


def _step_dirs(root: Path) -> list[str]:
    """Names of every step directory, complete or not, newest first."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()),
                  key=lambda name: int(name.removeprefix("step")), reverse=True)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step"))


# ---- checksums --------------------------------------------------------------------------------

def _n_chunks(size: int) -> int:
    return max(1, -(-size // CHUNK))


def _chunk_len(size: int, index: int) -> int:
    return max(0, min(CHUNK, size - index * CHUNK))


def _hash_chunk(path: Path, index: int, length: int) -> Optional[str]:
    """SHA-256 of `length` bytes of `path` from chunk `index`; None when the file ends first."""
    digest = hashlib.sha256()
    buf = memoryview(bytearray(min(_BLOCK, max(length, 1))))
    with open(path, "rb", buffering=0) as fh:
        fh.seek(index * CHUNK)
        left = length
        while left:
            n = fh.readinto(buf[:min(left, len(buf))])
            if not n:
                return None
            digest.update(buf[:n])
            left -= n
    return digest.hexdigest()


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # what Slurm's cpus_per_task leaves this rank
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


def _digest_files(root: Path, rels: list[str], sync: bool) -> dict[str, dict[str, Any]]:
    """{relative path: {"size": bytes, "sha256": [one digest per chunk]}}; sync: fsync each."""
    sizes = {rel: (root / rel).stat().st_size for rel in rels}
    jobs = [(rel, i) for rel in rels for i in range(_n_chunks(sizes[rel]))]
    with ThreadPoolExecutor(_threads()) as pool:
        digests = list(pool.map(
            lambda job: _hash_chunk(root / job[0], job[1], _chunk_len(sizes[job[0]], job[1])),
            jobs))
        if sync:
            list(pool.map(lambda rel: fsync_path(root / rel), rels))
    out = {rel: {"size": sizes[rel], "sha256": []} for rel in rels}
    for (rel, _), digest in zip(jobs, digests):
        if digest is None:
            raise HarnessError(f"{root / rel} shrank while it was being checksummed: something "
                               f"else writes into the checkpoint directory")
        out[rel]["sha256"].append(digest)
    return out


def _meta_digest(meta: dict[str, Any]) -> str:
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _files_under(root: Path) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


@contextmanager
def _recording_writes(engine, sink: list[str]) -> Iterator[None]:
    """Every path DeepSpeed's checkpoint engine saves to on this rank, appended to `sink`."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None or not hasattr(ckpt_engine, "save"):
        yield  # nothing to hook: rank 0 hashes whatever nobody claimed
        return
    had_own = "save" in vars(ckpt_engine)
    real = ckpt_engine.save

    def save(*args, **kwargs):
        result = real(*args, **kwargs)
        path = kwargs.get("path", args[1] if len(args) > 1 else None)
        if path is not None:
            sink.append(str(path))
        return result

    ckpt_engine.save = save
    try:
        yield
    finally:
        if had_own:
            ckpt_engine.save = real
        else:
            del ckpt_engine.save


# ---- verification -----------------------------------------------------------------------------

class _Group:
    """The collectives verification needs, also without a process group (a world of one)."""

    def __init__(self, comm: Optional[Collectives] = None):
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        if comm is None and initialized:
            comm = Collectives.for_process_group()
        self.comm = comm if initialized else None
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)

    def broadcast_object(self, obj):
        return self.comm.broadcast_object(obj) if self.comm is not None else obj

    def any_max(self, flags: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return flags
        on_device = flags.to(self.comm.device)
        self.comm.all_reduce(on_device, "max")
        return on_device.cpu()


def _summary(problems: list[tuple[str, str]], step_dir: Path) -> Optional[str]:
    """One short clause for a list of (file, what is wrong); a missing folder named once."""
    if not problems:
        return None
    gone_dirs = sorted({rel.split(os.sep)[0] for rel, what in problems if what == "missing"
                        and os.sep in rel and not (step_dir / rel.split(os.sep)[0]).exists()})
    items = [f"{d}/ is missing" for d in gone_dirs]
    items += [f"{rel}: {what}" for rel, what in problems
              if not (what == "missing" and os.sep in rel and rel.split(os.sep)[0] in gone_dirs)]
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return "; ".join(items[:3]) + more


def _legacy_problems(step_dir: Path, meta: dict[str, Any]) -> list[tuple[str, str]]:
    """Structure only, for a checkpoint saved before checksums existed."""
    ds = step_dir / "ds"
    if not ds.is_dir():
        return [(f"ds{os.sep}", "missing")]
    problems = []
    if not any(ds.glob("*model_states.pt")):
        problems.append(("ds", "holds no *model_states.pt"))
    problems += [(f"rank{r}.pt", "missing") for r in range(meta["world_size"])
                 if not (step_dir / f"rank{r}.pt").is_file()]
    return problems


def _well_formed(rel: Any, entry: Any) -> bool:
    return (isinstance(rel, str) and not os.path.isabs(rel) and ".." not in Path(rel).parts
            and isinstance(entry, dict) and isinstance(entry.get("size"), int)
            and entry["size"] >= 0 and isinstance(entry.get("sha256"), list)
            and len(entry["sha256"]) == _n_chunks(entry["size"])
            and all(isinstance(d, str) for d in entry["sha256"]))


def _inspect(step_dir: Path) -> dict[str, Any]:
    """Rank 0's cheap look (meta.json, every file's presence and size); broadcast to all.
    Never raises: the other ranks wait for its answer."""
    try:
        return _look(step_dir)
    except Exception as exc:  # noqa: BLE001 (an answer for everyone, not a hang)
        return {"problem": f"cannot be inspected: {type(exc).__name__}: {exc}"}


def _look(step_dir: Path) -> dict[str, Any]:
    if not step_dir.is_dir():
        return {"problem": "no such directory"}
    try:
        meta = json.loads((step_dir / META).read_text())
    except FileNotFoundError:
        return {"problem": f"no {META}: its save never completed"}
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        return {"problem": f"{META} is torn or unreadable: {type(exc).__name__}"}
    if not isinstance(meta, dict) or not all(
            isinstance(meta.get(k), int) for k in ("step", "consumed_samples", "world_size")):
        return {"problem": f"{META} lacks step, consumed_samples or world_size"}
    if not any(k in meta for k in ("files", "checksum", "meta_sha256")):  # saved before them
        if not (meta["step"] >= 0 and meta["consumed_samples"] >= 0
                and 1 <= meta["world_size"] <= 1 << 20):
            return {"problem": f"{META} holds impossible values"}
        return {"problem": _summary(_legacy_problems(step_dir, meta), step_dir), "files": None}
    if meta.get("meta_sha256") != _meta_digest(meta):
        return {"problem": f"{META} does not match its checksum (changed after the save)"}
    files = meta.get("files")
    if meta.get("checksum") != CHECKSUM:
        return {"problem": f"{META}: unknown checksum {meta.get('checksum')!r} (a newer "
                           f"harness wrote it?)"}
    if not isinstance(files, dict) or not all(_well_formed(rel, entry)
                                              for rel, entry in files.items()):
        return {"problem": f"{META}: malformed list of files"}
    problems = []
    for rel, entry in files.items():
        try:
            size = (step_dir / rel).stat().st_size
        except FileNotFoundError:
            problems.append((rel, "missing"))
            continue
        if size != entry["size"]:
            problems.append((rel, f"{size} bytes, {entry['size']} saved"))
    return {"problem": _summary(problems, step_dir), "files": files}


def _share(units: list[tuple[int, int, int]], rank: int, world: int) -> list[tuple[int, int, int]]:
    """This rank's part of (file index, chunk, bytes): largest first to the least loaded rank.
    Deterministic, so every rank computes every rank's part; no rank hashes more than
    total / world + one chunk."""
    load = [(0, r) for r in range(world)]
    mine = []
    for unit in sorted(units, key=lambda u: (-u[2], u[0], u[1])):
        done, r = heapq.heappop(load)
        if r == rank:
            mine.append(unit)
        heapq.heappush(load, (done + unit[2], r))
    return mine


def _verify(step_dir: Path, group: _Group) -> tuple[Optional[str], bool]:
    """(what is wrong or None, whether checksums were checked): the same on every rank.

    Collective: one broadcast, then one all-reduce when there are checksums to check."""
    t0 = time.perf_counter()
    head = group.broadcast_object(_inspect(step_dir) if group.rank == 0 else None)
    if head["problem"] or head.get("files") is None:
        return head["problem"], False
    files = head["files"]
    names = sorted(files)
    units = [(k, i, _chunk_len(files[name]["size"], i))
             for k, name in enumerate(names) for i in range(len(files[name]["sha256"]))]
    mine = _share(units, group.rank, group.world)

    def check(unit: tuple[int, int, int]) -> int:
        k, i, length = unit
        try:
            got = _hash_chunk(step_dir / names[k], i, length)
        except OSError:
            return _UNREADABLE
        return 0 if got == files[names[k]]["sha256"][i] else _MISMATCH

    with ThreadPoolExecutor(_threads()) as pool:
        verdicts = list(pool.map(check, mine))
    flags = torch.zeros(len(names), dtype=torch.int64)
    for (k, _, _), verdict in zip(mine, verdicts):
        flags[k] = max(int(flags[k]), verdict)
    flags = group.any_max(flags)
    what = {_MISMATCH: "checksum mismatch", _UNREADABLE: "unreadable"}
    problems = [(names[k], what[int(v)]) for k, v in enumerate(flags.tolist()) if v]
    if not problems and group.rank == 0:
        total = sum(f["size"] for f in files.values())
        log.info("verified %s: %d files, %.1f MiB in %.2f s", step_dir, len(files),
                 total / 2**20, time.perf_counter() - t0)
    return _summary(problems, step_dir), True


def _listing(root: Path) -> dict[str, Any]:
    try:
        return {"names": _step_dirs(root)}
    except OSError as exc:
        return {"error": f"checkpoint directory {root} cannot be read ({type(exc).__name__}: "
                         f"{exc}): fix its permissions, or set checkpoint.dir"}


def _older_sibling(step_dir: Path) -> Optional[Path]:
    older = [p for p in complete_checkpoints(step_dir.parent) if p.name < step_dir.name]
    return older[-1] if older else None



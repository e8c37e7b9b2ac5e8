"""`harness prepare-data` spread over processes (a Slurm job array, harness/slurm/prepare_array.py):

    prepare-data --stage tokenizer --tasks N   the work directory's plan and tokenizer, once
    prepare-data --part I/N                    slices k with k % N == I (N processes at once)
    prepare-data                               any slice still missing, then out_dir

The parts share the work directory of a plain preparation (slices.py), so the last step is the
plain command: it tokenizes what no part completed (a part that died), assembles the slices in
order and renames out_dir into place under its lease. The bytes are those of a single process:
the slices are cut at whole files and read back in order, whoever wrote them. Parts take no
lease (N of them run at once) and never write out_dir, nor touch another part's slices.

A mixture (data.mix) is spread the same way, source by source (mix_prepare.source_config: each
an ordinary preparation into <out_dir>/<name>/ with the mixture's tokenizer given): the first
step trains that tokenizer, then writes every source's plan and tokenizer copy; the parts are
over the concatenated list of (source, slice) pairs in data.mix's order, task I taking every
N-th pair, so a small source leaves no task idle; the plain step prepares each source in turn.
"""
from __future__ import annotations

import logging
import re
import sys
import time

from harness.common.errors import HarnessError
from harness.config.data import DataConfig
from harness.data import mix_prepare
from harness.data.prepare import (Scan, scan, split_by_tokens, take_lease, tokenize_slices,
                                  work_tokenizer)
from harness.data.slices import SLICE_BYTES, TOKENIZER, Work, remove_other_work, work_dir

log = logging.getLogger("harness")

# slices per part in a plan cut for N parts: their files' sizes differ, and 4 each spread the
# bytes evenly enough over the parts (one 128 MB slice each would leave some parts idle)
SLICES_PER_TASK = 4
MAX_TASKS = 100_000


def main(cfg: DataConfig, part: str | None, stage: str | None, tasks: int | None) -> int:
    """prepare-data with --part or --stage (cli.py)."""
    if part is not None and (stage or tasks is not None):
        raise HarnessError("prepare-data --part I/N takes neither --stage nor --tasks (N is "
                           "the part's): e.g. prepare-data --part 0/4")
    if part is not None:
        return run_part(cfg, *parse_part(part))
    if stage is None:
        raise HarnessError("prepare-data --tasks N goes with --submit or --stage tokenizer")
    if tasks is not None:
        check_tasks(tasks)
    return run_stage(cfg, tasks)


def parse_part(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]) <= MAX_TASKS:
        raise HarnessError(f"prepare-data --part {text}: write I/N with 0 <= I < N <= "
                           f"{MAX_TASKS}, e.g. --part 0/4 (the first of 4 parts)")
    return int(match[1]), int(match[2])


def check_tasks(tasks: int) -> None:
    if not 1 <= tasks <= MAX_TASKS:
        raise HarnessError(f"prepare-data --tasks {tasks}: must be in 1..{MAX_TASKS}")


def slice_bytes(found: list[Scan], tasks: int | None) -> int:
    """A plan for N parts: SLICES_PER_TASK slices each (over all of a mixture's sources),
    never larger than a plain plan's."""
    if tasks is None:
        return SLICE_BYTES
    total = sum(s.bytes_used for f in found for s in f.sources)
    return max(1, min(SLICE_BYTES, -(-total // (SLICES_PER_TASK * tasks))))


def _scanned(cfg: DataConfig, what: str) -> list[Scan]:
    """The scans of what is not up to date yet: the corpus, or each source of a mixture in
    data.mix's order (each up-to-date one said in a line: nothing to do for it)."""
    subs = [mix_prepare.source_config(cfg, e) for e in cfg.mix] if cfg.mix else [cfg]
    found = []
    for sub in subs:
        one = scan(sub)
        if one is None or one.up_to_date():
            print(f"prepare-data {what}: {sub.out_dir} is up to date: nothing to do")
        else:
            found.append(one)
    return found


def run_stage(cfg: DataConfig, tasks: int | None) -> int:
    """The plan (cut for `tasks` parts) and the tokenizer, under out_dir's lease: the tokenizer
    is trained once, before the parts that need it (a mixture's: under its own lease, then
    copied into each source's work directory)."""
    start = time.perf_counter()
    if cfg.mix:
        mix_prepare.prepare_tokenizer(cfg)
    found = _scanned(cfg, "--stage tokenizer")
    size, planned = slice_bytes(found, tasks), []
    for one in found:
        held = take_lease(one.out_dir)
        try:
            if one.up_to_date():  # prepared by a plain prepare-data that held the lease
                print(f"prepare-data --stage tokenizer: {one.out_dir} is up to date")
                continue
            work_path = work_dir(one.out_dir, one.inputs)
            remove_other_work(one.out_dir, work_path)
            # parts of an earlier submission may still be writing: their .part dirs stay
            work = Work(work_path, one.sources, size, own=lambda k: False)
            work_tokenizer(one.cfg, one.sources, one.given, work)
            planned.append((work_path, len(work.slices)))
        finally:
            held.release()
    if planned:
        where = planned[0][0] if len(planned) == 1 else \
            f"{len(planned)} work directories in {cfg.out_dir}"
        print(f"prepare-data --stage tokenizer: {sum(n for _, n in planned)} slices planned "
              f"in {where} (for {tasks or 'any number of'} parts), tokenizer ready, in "
              f"{time.perf_counter() - start:.1f} s")
    return 0


def run_part(cfg: DataConfig, index: int, parts: int) -> int:
    """Tokenize the slices not done yet whose index k in the plan (of a mixture: in the
    sources' plans one after the other) has k % parts == index, into the work directories."""
    start = time.perf_counter()
    what = f"--part {index}/{parts}"
    if cfg.mix and not mix_prepare.prepare_tokenizer(cfg, train=False):
        raise _no_tokenizer(what, cfg.out_dir, parts)
    found = _scanned(cfg, what)
    size, offset, done, mine, mb = slice_bytes(found, parts), 0, 0, 0, 0.0
    for one in found:
        work_path = work_dir(one.out_dir, one.inputs)
        if one.given is None and not (work_path / TOKENIZER).is_file():
            raise _no_tokenizer(what, work_path, parts)
        one.out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Work(work_path, one.sources, size,
                    own=lambda k, first=offset: (first + k) % parts == index)
        # a given tokenizer is copied by whichever part comes first (by rename: the same bytes)
        tokenizer = work_tokenizer(one.cfg, one.sources, one.given, work)
        ks = [k for k in range(len(work.slices)) if (offset + k) % parts == index]
        ok = tokenize_slices(one.cfg, one.sources, work, tokenizer,
                             split_by_tokens(one.cfg, one.sources), sys.stderr.isatty(), ks)
        mb += sum(s.bytes_used for k in ok for s in one.sources[slice(*work.slices[k])]) / 1e6
        offset, done, mine = offset + len(work.slices), done + len(ok), mine + len(ks)
    if found:
        print(f"prepare-data {what}: tokenized {done} of its {mine} slices ({offset} in all; "
              f"{mb:.1f} MB) in {time.perf_counter() - start:.1f} s; `harness prepare-data` "
              f"with the same config assembles {cfg.out_dir}")
    return 0


def _no_tokenizer(what: str, where, parts: int) -> HarnessError:
    return HarnessError(
        f"prepare-data {what}: no tokenizer in {where} yet: run `harness prepare-data "
        f"--stage tokenizer --tasks {parts}` with the same config first (the first job of "
        f"prepare-data --submit)")

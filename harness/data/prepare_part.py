"""`harness prepare-data` spread over processes (a Slurm job array, harness/slurm/prepare_array.py):

    prepare-data --stage tokenizer --tasks N   the work directory's plan and tokenizer, once
    prepare-data --part I/N                    slices k with k % N == I (N processes at once)
    prepare-data                               any slice still missing, then out_dir

The parts share the work directory of a plain preparation (slices.py), so the last step is the
plain command: it tokenizes what no part completed (a part that died), assembles the slices in
order and renames out_dir into place under its lease. The bytes are those of a single process:
the slices are cut at whole files and read back in order, whoever wrote them. Parts take no
lease (N of them run at once) and never write out_dir, nor touch another part's slices.
"""
from __future__ import annotations

import logging
import re
import sys
import time

from harness.common.errors import HarnessError
from harness.config.data import DataConfig
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
    check_not_mix(cfg)
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


def check_not_mix(cfg: DataConfig) -> None:
    if cfg.mix:  # prepared source by source with one tokenizer: harness/data/mix_prepare.py
        raise HarnessError("prepare-data --submit, --part and --stage prepare data.sources, "
                           "not a data.mix yet: run `harness prepare-data` for the mixture")


def parse_part(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]) <= MAX_TASKS:
        raise HarnessError(f"prepare-data --part {text}: write I/N with 0 <= I < N <= "
                           f"{MAX_TASKS}, e.g. --part 0/4 (the first of 4 parts)")
    return int(match[1]), int(match[2])


def check_tasks(tasks: int) -> None:
    if not 1 <= tasks <= MAX_TASKS:
        raise HarnessError(f"prepare-data --tasks {tasks}: must be in 1..{MAX_TASKS}")


def slice_bytes(found: Scan, tasks: int | None) -> int:
    """A plan for N parts: SLICES_PER_TASK slices each, never larger than a plain plan's."""
    if tasks is None:
        return SLICE_BYTES
    total = sum(s.bytes_used for s in found.sources)
    return max(1, min(SLICE_BYTES, -(-total // (SLICES_PER_TASK * tasks))))


def _scanned(cfg: DataConfig, what: str) -> Scan | None:
    """The scan, or None (with the line) when out_dir is up to date: nothing to do."""
    found = scan(cfg)
    if found is None or found.up_to_date():
        print(f"prepare-data {what}: {cfg.out_dir} is up to date: nothing to do")
        return None
    return found


def run_stage(cfg: DataConfig, tasks: int | None) -> int:
    """The plan (cut for `tasks` parts) and the tokenizer, under out_dir's lease: the tokenizer
    is trained once, before the parts that need it."""
    start = time.perf_counter()
    found = _scanned(cfg, "--stage tokenizer")
    if found is None:
        return 0
    held = take_lease(found.out_dir)
    try:
        if found.up_to_date():  # prepared by a plain prepare-data that held the lease
            print(f"prepare-data --stage tokenizer: {cfg.out_dir} is up to date")
            return 0
        work_path = work_dir(found.out_dir, found.inputs)
        remove_other_work(found.out_dir, work_path)
        # parts of an earlier submission may still be writing: their .part dirs stay
        work = Work(work_path, found.sources, slice_bytes(found, tasks), own=lambda k: False)
        work_tokenizer(cfg, found.sources, found.given, work)
    finally:
        held.release()
    print(f"prepare-data --stage tokenizer: {len(work.slices)} slices planned in {work_path} "
          f"(for {tasks or 'any number of'} parts), tokenizer ready, in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def run_part(cfg: DataConfig, index: int, parts: int) -> int:
    """Tokenize the slices k % parts == index not done yet, into the work directory."""
    start = time.perf_counter()
    what = f"--part {index}/{parts}"
    found = _scanned(cfg, what)
    if found is None:
        return 0
    work_path = work_dir(found.out_dir, found.inputs)
    if found.given is None and not (work_path / TOKENIZER).is_file():
        raise HarnessError(
            f"prepare-data {what}: no tokenizer in {work_path} yet: run `harness prepare-data "
            f"--stage tokenizer --tasks {parts}` with the same config first (the first job of "
            f"prepare-data --submit)")
    found.out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Work(work_path, found.sources, slice_bytes(found, parts),
                own=lambda k: k % parts == index)
    # a given tokenizer is copied by whichever part comes first (by rename: the same bytes)
    tokenizer = work_tokenizer(cfg, found.sources, found.given, work)
    mine = list(range(index, len(work.slices), parts))
    done = tokenize_slices(cfg, found.sources, work, tokenizer,
                           split_by_tokens(cfg, found.sources), sys.stderr.isatty(), mine)
    mb = sum(s.bytes_used for k in done for s in found.sources[slice(*work.slices[k])]) / 1e6
    print(f"prepare-data {what}: tokenized {len(done)} of its {len(mine)} slices "
          f"({len(work.slices)} in all; {mb:.1f} MB) in {time.perf_counter() - start:.1f} s; "
          f"`harness prepare-data` with the same config assembles {found.out_dir}")
    return 0

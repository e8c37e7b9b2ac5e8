"""prepare-data in parts (issue 26 item 3), run by hand as a Slurm job array runs them: the
first step (`--stage tokenizer --tasks 3`), parts `--part I/3`, then a plain prepare-data.
The result equals a plain single-process preparation file for file, byte for byte (manifest
included); a part that never ran (or died mid-slice) is redone by the last step; a part never
writes out_dir nor removes another part's slice in progress. A mixture (data.mix) in parts: every
file under its out_dir as a plain single-process preparation of the mixture writes it."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from engine_utils import child_env

from harness.cli import main as cli_main
from harness.common.errors import HarnessError
from harness.config.data import DataConfig, MixSource
from harness.data import prepare as prep
from harness.data import prepare_part as parts
from harness.data import slices
from harness.data.mix_prepare import prepare_mix

TASKS = 3
NAMES = ("note", "web", "code")  # a mixture's sources, in data.mix's order


def _text_corpus(root: Path) -> Path:
    """24 text files: a small corpus (the validation split by tokens)."""
    root.mkdir()
    for i in range(24):
        (root / f"doc{i:03d}.txt").write_text(
            "".join(f"line {j} of {i}: w{(i * j) % 41} x{j % 7}\n" for j in range(40 + i)))
    return root


def _jsonl_corpus(root: Path) -> Path:
    """12 JSONL files of 50 documents: enough for whole validation documents."""
    root.mkdir()
    for i in range(12):
        docs = [{"text": f"doc {d} of file {i}: " + " ".join(f"w{(i * d + j) % 53}"
                                                            for j in range(20 + d % 9))}
                for d in range(50)]
        (root / f"part{i:02d}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root


def _cfg(src: Path, out: Path) -> DataConfig:
    return DataConfig(sources=[str(src)], out_dir=str(out), vocab_size=300, val_fraction=0.2)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _work(out: Path) -> Path:
    (work,) = out.parent.glob(f".{out.name}{slices.WORK_INFIX}*")
    return work


def _prepared(make, root: Path) -> tuple[Path, dict[str, bytes]]:
    """(sources, the files of their plain single-process preparation)."""
    src = make(root / "src")
    return src, _files(prep.prepare_data(_cfg(src, root / "ref"), progress=False))


@pytest.fixture(scope="module", params=[_text_corpus, _jsonl_corpus], ids=["text", "jsonl"])
def corpus(request, tmp_path_factory):
    return _prepared(request.param, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    return _prepared(_text_corpus, tmp_path_factory.mktemp("text"))


def test_parts_then_the_plain_step_give_the_plain_bytes(corpus, tmp_path, caplog, capsys):
    src, reference = corpus
    out = tmp_path / "out"
    assert parts.run_stage(_cfg(src, out), TASKS) == 0
    plan = json.loads((_work(out) / slices.PLAN).read_text())["slices"]
    # cut for the parts: about SLICES_PER_TASK each (of whole files), not one 128 MB slice
    assert 2 * TASKS < len(plan) <= TASKS * parts.SLICES_PER_TASK
    for i in (2, 0, 1):  # in any order
        assert parts.run_part(_cfg(src, out), i, TASKS) == 0
        assert not out.exists()  # a part never writes out_dir
    said = capsys.readouterr().out
    for i in range(TASKS):
        n = len(range(i, len(plan), TASKS))
        assert f"--part {i}/{TASKS}: tokenized {n} of its {n} slices ({len(plan)} in all" in said
    done = sorted(p.name for p in _work(out).glob("slice-*"))
    assert done == [f"slice-{k:05d}" for k in range(len(plan))]
    with caplog.at_level(logging.INFO, logger="harness"):
        prep.prepare_data(_cfg(src, out), progress=False)
    # none redone
    assert f"resuming with {len(plan)} of {len(plan)} slices already tokenized" in caplog.text
    assert _files(out) == reference  # manifest included: nothing in it differs
    assert not list(tmp_path.glob(".out.*"))  # the work directory went with the assembly


def test_a_missing_part_is_redone_by_the_plain_step(corpus, tmp_path, caplog):
    src, reference = corpus
    out = tmp_path / "out"
    parts.run_stage(_cfg(src, out), TASKS)
    work = _work(out)
    # part 1 died mid-slice on another node: its .part dir stays while parts 0 and 2 run
    left = {name: work / name for name in ("slice-00001.part-7@n2", "slice-00000.part-7@n2",
                                           "plan.json.part-7@n2")}
    for path in left.values():
        path.mkdir()
        (path / "train.bin").write_bytes(b"\xff" * 64)
    for i in (0, 2):
        parts.run_part(_cfg(src, out), i, TASKS)
    assert left["slice-00001.part-7@n2"].is_dir() and left["plan.json.part-7@n2"].is_dir()
    assert not left["slice-00000.part-7@n2"].exists()  # part 0's own leftover: removed
    planned = len(json.loads((work / slices.PLAN).read_text())["slices"])
    missing = len(range(1, planned, TASKS))
    assert len(list(work.glob("slice-?????"))) == planned - missing
    with caplog.at_level(logging.INFO, logger="harness"):
        prep.prepare_data(_cfg(src, out), progress=False)
    assert f"resuming with {planned - missing} of {planned} slices" in caplog.text
    assert _files(out) == reference
    assert not work.exists()


def test_two_parts_at_once_in_processes(text_corpus, tmp_path):
    """Parts 0 and 1 as two `harness prepare-data --part` processes at the same time, part 2
    left to the plain step: the same bytes."""
    src, reference = text_corpus
    out = tmp_path / "out"
    args = [f"data.sources=[{src}]", f"data.out_dir={out}", "data.vocab_size=300",
            "data.val_fraction=0.2"]
    run = [sys.executable, "-m", "harness.cli", "prepare-data", *args]
    stage = subprocess.run([*run, "--stage", "tokenizer", "--tasks", "3"], env=child_env(),
                           capture_output=True, text=True, timeout=120)
    assert stage.returncode == 0, stage.stderr
    procs = [subprocess.Popen([*run, "--part", f"{i}/3"], env=child_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0 and ": tokenized " in stdout, stderr
    prep.prepare_data(_cfg(src, out), progress=False)
    assert _files(out) == reference


def test_with_a_given_tokenizer_the_parts_need_no_first_step(text_corpus, tmp_path):
    """data.tokenizer_model: each part copies it (the same bytes, by rename) and cuts the same
    plan for N parts itself."""
    src, reference = text_corpus
    given = tmp_path / "given.model"
    given.write_bytes(reference["tokenizer.model"])

    def cfg(out: Path) -> DataConfig:
        return DataConfig(sources=[str(src)], out_dir=str(out), tokenizer_model=str(given),
                          val_fraction=0.2)

    plain = _files(prep.prepare_data(cfg(tmp_path / "plain"), progress=False))
    out = tmp_path / "out"
    for i in range(TASKS):
        parts.run_part(cfg(out), i, TASKS)
    assert len(list(_work(out).glob("slice-?????"))) > TASKS
    assert _files(prep.prepare_data(cfg(out), progress=False)) == plain


def test_a_part_needs_the_tokenizer_first(corpus, tmp_path):
    src, _ = corpus
    with pytest.raises(HarnessError, match=r"--part 1/3: no tokenizer .* --stage tokenizer"):
        parts.run_part(_cfg(src, tmp_path / "out"), 1, 3)
    assert not (tmp_path / "out").exists()


def test_an_up_to_date_out_dir_leaves_nothing_to_do(corpus, tmp_path, capsys):
    src, reference = corpus
    out = prep.prepare_data(_cfg(src, tmp_path / "out"), progress=False)
    assert parts.run_part(_cfg(src, out), 0, 3) == 0
    assert parts.run_stage(_cfg(src, out), 3) == 0
    assert capsys.readouterr().out.count("is up to date: nothing to do") == 2
    assert not list(tmp_path.glob(".out.*")) and _files(out) == reference


def _tree(d: Path) -> dict[str, bytes]:
    """Every file under d (hidden ones too), by its path inside d."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _mix(root: Path, out: Path, **more) -> DataConfig:
    """note (one small file: one slice), web (24 text files), code (12 JSONL files)."""
    return DataConfig(mix=[MixSource(name="note", sources=[str(root / "note")]),
                           MixSource(name="web", sources=[str(root / "web")], weight=3),
                           MixSource(name="code", sources=[str(root / "code")])],
                      out_dir=str(out), vocab_size=300, val_fraction=0.2, **more)


@pytest.fixture(scope="module")
def mix_corpus(tmp_path_factory):
    """(the sources' root, every file of their plain single-process mixture preparation)."""
    root = tmp_path_factory.mktemp("mix")
    _text_corpus(root / "web")
    _jsonl_corpus(root / "code")
    (root / "note").mkdir()
    (root / "note" / "a.txt").write_text("".join(f"note {j}: n{j % 5}\n" for j in range(90)))
    prepare_mix(_mix(root, root / "ref"), progress=False)
    return root, _tree(root / "ref")


def _mix_plans(out: Path) -> list[tuple[str, int]]:
    """The (source, slice) pairs in data.mix's order, from the sources' work plans."""
    pairs = []
    for name in NAMES:
        plan = json.loads((_work(out / name) / slices.PLAN).read_text())["slices"]
        pairs += [(name, k) for k in range(len(plan))]
    return pairs


def _mix_done(out: Path) -> set[tuple[str, int]]:
    return {(name, int(p.name[6:])) for name in NAMES
            for p in _work(out / name).glob("slice-?????")}


def test_a_mixture_in_parts_gives_the_plain_bytes(mix_corpus, tmp_path, caplog, capsys):
    """The first step trains the mixture's tokenizer and plans every source; part I tokenizes
    every N-th (source, slice) pair in data.mix's order; the plain step assembles each
    source: every file under out_dir as a single process writes it."""
    root, reference = mix_corpus
    out = tmp_path / "out"
    assert parts.run_stage(_mix(root, out), TASKS) == 0
    assert (out / "tokenizer.model").read_bytes() == reference["tokenizer.model"]
    pairs = _mix_plans(out)
    # the plan cut over all the sources; the small one's slice shifts the others' parts
    assert pairs[:2] == [("note", 0), ("web", 0)] and len(pairs) > 2 * TASKS
    for name in NAMES:  # the mixture's tokenizer copied for each
        assert (_work(out / name) / slices.TOKENIZER).read_bytes() == reference["tokenizer.model"]
    assert parts.run_part(_mix(root, out), 1, TASKS) == 0
    assert _mix_done(out) == set(pairs[1::TASKS])  # across the sources, not source by source
    for i in (2, 0):
        assert parts.run_part(_mix(root, out), i, TASKS) == 0
    said = capsys.readouterr().out
    for i in range(TASKS):
        n = len(pairs[i::TASKS])
        assert f"--part {i}/{TASKS}: tokenized {n} of its {n} slices ({len(pairs)} in all" in said
    assert _mix_done(out) == set(pairs)
    assert not any((out / name).exists() for name in NAMES)
    with caplog.at_level(logging.INFO, logger="harness"):
        prepare_mix(_mix(root, out), progress=False)
    assert caplog.text.count("slices already tokenized") == 3  # none redone
    assert _tree(out) == reference


def test_a_mixture_part_left_out_is_redone_by_the_plain_step(mix_corpus, tmp_path):
    root, reference = mix_corpus
    given = tmp_path / "given.model"  # a given tokenizer: the parts need no first step
    given.write_bytes(reference["tokenizer.model"])
    plain = _tree(prepare_mix(_mix(root, tmp_path / "plain", tokenizer_model=str(given)),
                              progress=False)[0].parent)
    out = tmp_path / "out"
    for i in (0, 2):
        parts.run_part(_mix(root, out, tokenizer_model=str(given)), i, TASKS)
    pairs = _mix_plans(out)
    assert _mix_done(out) == set(pairs) - set(pairs[1::TASKS])
    prepare_mix(_mix(root, out, tokenizer_model=str(given)), progress=False)
    assert _tree(out) == plain


def test_a_mixture_part_needs_the_tokenizer_first(mix_corpus, tmp_path):
    root, _ = mix_corpus
    with pytest.raises(HarnessError, match=r"--part 0/3: no tokenizer .* --stage tokenizer"):
        parts.run_part(_mix(root, tmp_path / "out"), 0, 3)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["3/3", "-1/3", "1", "a/b", "0/0", "1/200000"])
def test_bad_part_names_the_flag(text):
    with pytest.raises(HarnessError, match=r"--part .*I/N"):
        parts.parse_part(text)


@pytest.mark.parametrize("flags, says", [
    (["--part", "0/2", "--tasks", "2"], "neither --stage nor --tasks"),
    (["--tasks", "2"], "--tasks N goes with --submit or --stage"),
    (["--stage", "tokenizer", "--tasks", "0"], "--tasks 0: must be in"),
    (["--part", "0/2", "--submit"], "not allowed with argument"),
])
def test_bad_flag_combinations(flags, says, capsys):
    assert cli_main(["prepare-data", *flags]) == 2
    assert says in capsys.readouterr().err

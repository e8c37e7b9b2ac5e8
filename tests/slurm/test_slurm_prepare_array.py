"""`harness prepare-data --submit` on a real 2-node Slurm cluster (tests/slurm_cluster.sh): the
tokenizer job, an array of 3 parts, the assembly; data.out_dir equals a single-process
preparation of the same inputs file for file, byte for byte (manifest included). A task that
never runs (cancelled) leaves its slices to the assembly, with the same bytes.

The corpus is small (24 files, ~60 kB): the plan cut for N parts has ~4 slices per part
(prepare_part.SLICES_PER_TASK), so each of the 3 tasks tokenizes slices of its own. A data.mix
of a one-file source and that corpus: every file under data.out_dir as a plain single-process
preparation of the mixture writes it (~5 s more)."""
import re
import subprocess
import sys

import pytest
from engine_utils import child_env
from slurm_fixtures import slurm_cluster  # noqa: F401  (fixture)

from harness.config.data import DataConfig, MixSource
from harness.data.mix_prepare import prepare_mix
from harness.data.prepare import prepare_data

pytestmark = pytest.mark.slow

TASKS = 3


def _corpus(root):
    root.mkdir()
    for i in range(24):
        (root / f"doc{i:03d}.txt").write_text(
            "".join(f"line {j} of {i}: w{(i * j) % 41} x{j % 7}\n" for j in range(40 + i)))
    return root


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(sources, the files of their plain single-process preparation). The tokenizer job
    runs on 1 core (slurm.cpus_per_task=1) and this process on 2: the same tokenizer all the
    same, trained on data.tokenizer_threads threads whatever the cores."""
    root = tmp_path_factory.mktemp("corpus")
    src = _corpus(root / "src")
    cfg = DataConfig(sources=[str(src)], out_dir=str(root / "ref"), vocab_size=300,
                     val_fraction=0.2)
    return src, _files(prepare_data(cfg, progress=False))


def _submit(cluster, src, out, *more: str) -> list[str]:
    """`src`: data.sources, or a data.mix=... override."""
    data = src if str(src).startswith("data.mix=") else f"data.sources=[{src}]"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "prepare-data", "--config", "tiny", "--submit",
         "--tasks", str(TASKS), data, f"data.out_dir={out}",
         "data.vocab_size=300", "data.val_fraction=0.2", "data.max_bytes=0", "slurm.nodes=2",
         "slurm.gpus_per_node=0", "slurm.cpus_per_task=1", "slurm.time=0-00:10:00", *more],
        env=child_env(SLURM_CONF=cluster.env["SLURM_CONF"]), capture_output=True, text=True,
        timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    ids = proc.stdout.split()
    assert len(ids) == 3 and all(i.isdigit() for i in ids), proc.stdout
    return ids


def _states(cluster, job: str) -> list[str]:
    """JobState of each task of an array (or of the job)."""
    lines = cluster.run("scontrol", "show", "job", "--oneliner", job).splitlines()
    return [re.search(r"JobState=(\S+)", ln)[1] for ln in lines if ln.strip()]


def test_the_array_gives_the_single_process_bytes(slurm_cluster, corpus,  # noqa: F811
                                                  tmp_path):
    src, reference = corpus
    out = tmp_path / "out"
    # a node per task (--exclusive): the parts write one work directory from both nodes
    tokenizer, array, assemble = _submit(slurm_cluster, src, out,
                                         "slurm.extra_sbatch=[--exclusive]")
    info = slurm_cluster.wait(assemble, timeout=300)
    logs = {p.name: p.read_text() for p in (tmp_path / "out.prepare").glob("*.out")}
    assert info["JobState"] == "COMPLETED", logs
    assert _states(slurm_cluster, tokenizer) == ["COMPLETED"], logs
    assert _states(slurm_cluster, array) == ["COMPLETED"] * TASKS, logs
    hosts = set()
    for i in range(TASKS):
        said = logs[f"part-{array}_{i}.out"]
        match = re.search(rf"--part {i}/{TASKS}: tokenized (\d+) of its (\d+) slices", said)
        assert match and int(match[1]) == int(match[2]) > 0, said  # each part did its own
        hosts.add(re.search(r"parts: job \d+ on (\S+)", said)[1])
    assert hosts == {"n1", "n2"}, logs
    done = re.search(r"resuming with (\d+) of (\d+) slices", logs[f"assemble-{assemble}.out"])
    assert done and done[1] == done[2], logs  # the assembly tokenized nothing again
    assert _files(out) == reference


def test_a_task_that_never_ran_is_redone_by_the_assembly(slurm_cluster, corpus,  # noqa: F811
                                                         tmp_path):
    src, reference = corpus
    out = tmp_path / "out"
    # submitted held, so that task 1 is cancelled before anything runs
    tokenizer, array, assemble = _submit(slurm_cluster, src, out, "slurm.extra_sbatch=[--hold]")
    slurm_cluster.run("scancel", f"{array}_1")
    slurm_cluster.run("scontrol", "release", tokenizer, array, assemble)
    info = slurm_cluster.wait(assemble, timeout=300)
    logs = {p.name: p.read_text() for p in (tmp_path / "out.prepare").glob("*.out")}
    assert info["JobState"] == "COMPLETED", logs
    assert f"part-{array}_1.out" not in logs
    done = re.search(r"resuming with (\d+) of (\d+) slices", logs[f"assemble-{assemble}.out"])
    assert done and 0 < int(done[1]) < int(done[2]), logs  # parts 0 and 2's, not part 1's
    assert _files(out) == reference


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_mixture_over_the_array_gives_the_single_process_bytes(  # noqa: F811
        slurm_cluster, corpus, tmp_path):
    src, _ = corpus
    (tmp_path / "note").mkdir()
    (tmp_path / "note" / "a.txt").write_text("".join(f"note {j}: n{j % 5}\n" for j in range(90)))
    mix = [MixSource(name="note", sources=[str(tmp_path / "note")]),
           MixSource(name="web", sources=[str(src)], weight=3)]
    ref = DataConfig(mix=mix, out_dir=str(tmp_path / "ref"), vocab_size=300, val_fraction=0.2)
    prepare_mix(ref, progress=False)
    out = tmp_path / "out"
    _, array, assemble = _submit(
        slurm_cluster, f"data.mix=[{{name: note, sources: [{tmp_path / 'note'}]}}, "
                       f"{{name: web, sources: [{src}], weight: 3}}]", out)
    info = slurm_cluster.wait(assemble, timeout=300)
    logs = {p.name: p.read_text() for p in (tmp_path / "out.prepare").glob("*.out")}
    assert info["JobState"] == "COMPLETED", logs
    for i in range(TASKS):  # the (source, slice) pairs spread: every part did some
        said = logs[f"part-{array}_{i}.out"]
        match = re.search(rf"--part {i}/{TASKS}: tokenized (\d+) of its (\d+) slices", said)
        assert match and int(match[1]) == int(match[2]) > 0, said
    done = re.findall(r"resuming with (\d+) of (\d+) slices", logs[f"assemble-{assemble}.out"])
    assert len(done) == 2 and all(a == b for a, b in done), logs  # per source, none redone
    assert _tree(out) == _tree(tmp_path / "ref")

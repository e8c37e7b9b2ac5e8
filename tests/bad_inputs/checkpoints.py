"""Corrupt, incomplete and old checkpoints (issue 12, item 5).

A template run (1 layer, 3 steps, a checkpoint after every step) is trained once per process in
its own process, for ZeRO 0 and ZeRO 1; each case copies it into its directory with the token
shards, damages the copy, and runs `harness train` with the same arguments, in its own process
(a fresh DeepSpeed each time; forked from a warm interpreter, tests/forked_cli.py). checkpoint.resume=auto falls back past damaged checkpoints to the
newest intact one (exit 0) and stops with one line when none is intact; a checkpoint named by
checkpoint.resume that is damaged is an error, never silently replaced. The older checkpoints,
and the damaged ones when the run stops, are left byte for byte as they were.
tests/checkpoint/test_checkpoint_fallback.py checks the warnings and that the fallback is
bit-identical.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from bad_inputs import Case

ARGS = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=3",
        "optim.warmup_steps=1", "checkpoint.every=1", "checkpoint.keep_last=3",
        "data.eval_every=0", "data.max_bytes=300000", "data.vocab_size=512"]
RUN = ["train.run_dir={tmp}/run", "data.out_dir={tmp}/shards"]
CK = "run/checkpoints"
MS = "ds/mp_rank_00_model_states.pt"
OPT1 = "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"


# ---- the template runs -------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cache() -> Path:
    root = Path(tempfile.mkdtemp(prefix="battery-checkpoints-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def _overrides(tmp: Path, stage: int) -> list[str]:
    return [*ARGS, f"zero.stage={stage}",
            *(a.replace("{tmp}", str(tmp)) for a in RUN)]


@functools.lru_cache(maxsize=None)
def _template(stage: int) -> Path:
    """{cache}/stageN/{run,shards}: a finished 3-step run with checkpoints at 1, 2 and 3."""
    import forked_cli  # a process of its own, forked from a warm interpreter
    from engine_utils import child_env

    from harness.config import load_config
    from harness.data.prepare import prepare_data

    root = _cache() / f"stage{stage}"
    shards = _cache() / "stage0" / "shards"
    if not (shards / "manifest.json").is_file():
        prepare_data(load_config("tiny", _overrides(_cache() / "stage0", 0)).data, progress=False)
    if stage:
        shutil.copytree(shards, root / "shards")
    root.mkdir(parents=True, exist_ok=True)
    code, _, err = forked_cli.run(["train", "--config", "tiny", *_overrides(root, stage)], root,
                                  child_env())
    if code != 0:
        raise RuntimeError(f"template run failed:\n{err[-3000:]}")
    return root


def _copy(tmp: Path, stage: int) -> None:
    """The template run and its shards, moved into the case's directory as a user would."""
    src = _template(stage)
    shutil.copytree(src / "run", tmp / "run")
    shutil.copytree(src / "shards", tmp / "shards")


# ---- damage ------------------------------------------------------------------------------------

def truncate(rel: str) -> Callable[[Path], None]:
    def do(step: Path) -> None:
        data = (step / rel).read_bytes()
        (step / rel).write_bytes(data[:len(data) // 2])
    return do


def flip(rel: str) -> Callable[[Path], None]:
    def do(step: Path) -> None:
        data = bytearray((step / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (step / rel).write_bytes(bytes(data))
    return do


def write(rel: str, content: bytes) -> Callable[[Path], None]:
    return lambda step: (step / rel).write_bytes(content)


def delete(rel: str) -> Callable[[Path], None]:
    def do(step: Path) -> None:
        target = step / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return do


def edit_meta(step: Path) -> None:
    """Valid JSON, one number changed: only meta.json's own checksum can tell."""
    meta = json.loads((step / "meta.json").read_text())
    meta["consumed_samples"] += 4
    (step / "meta.json").write_text(json.dumps(meta, indent=2))


def strip_checksums(step: Path) -> None:
    """As saved before checkpoints carried checksums."""
    meta = json.loads((step / "meta.json").read_text())
    for key in ("files", "checksum", "meta_sha256"):
        meta.pop(key, None)
    (step / "meta.json").write_text(json.dumps(meta, indent=2))


def setup(damage: dict[int, list[Callable[[Path], None]]], stage: int = 0, legacy: bool = False,
          then: Optional[Callable[[Path], None]] = None) -> Callable[[Path], None]:
    def do(tmp: Path) -> None:
        _copy(tmp, stage)
        if legacy:
            for step in (1, 2, 3):
                strip_checksums(tmp / CK / f"step{step:08d}")
        for step, fns in damage.items():
            for fn in fns:
                fn(tmp / CK / f"step{step:08d}")
        if then is not None:
            then(tmp)
    return do


def step_files(*steps: int, rels=("meta.json", MS, "rank0.pt")) -> tuple[str, ...]:
    return tuple(f"{CK}/step{s:08d}/{rel}" for s in steps for rel in rels)


def train(*extra: str, stage: int = 0) -> list[str]:
    return ["train", "--config", "tiny", *ARGS, f"zero.stage={stage}", *RUN, *extra]


def falls_back(id: str, damage: dict, stage: int = 0, legacy: bool = False, then=None,
               intact=(1, 2), extra=(), also=()) -> Case:
    """Resumes from the newest intact checkpoint and finishes: exit 0; older ones untouched."""
    return Case(id, train(*extra, stage=stage), exit_code=0, slow=True, process=True,
                setup=setup(damage, stage, legacy, then),
                unchanged=(*step_files(*intact), *also))


def refused(id: str, damage: dict, words: tuple[str, ...], extra=(), legacy: bool = False,
            then=None) -> Case:
    """Stops with one error line; every checkpoint, damaged or not, is left as it was (a file
    the damage deleted stays missing)."""
    return Case(id, train(*extra), words=words, slow=True, process=True,
                setup=setup(damage, 0, legacy, then),
                unchanged=(*step_files(1, 2, 3), "run/metrics.jsonl"))


NAMED3 = "checkpoint.resume={tmp}/" + CK + "/step00000003"
NAMED2 = "checkpoint.resume={tmp}/" + CK + "/step00000002"


def _set_aside_before(tmp: Path) -> None:
    """A corrupt-step00000003 from an earlier fallback is in the way of the next one."""
    (tmp / CK / "corrupt-step00000003").mkdir()
    (tmp / CK / "corrupt-step00000003" / "note").write_text("set aside last week\n")


def remove_step(step: Path) -> None:
    shutil.rmtree(step)


def _only_step1(tmp: Path) -> None:
    for step in (2, 3):
        shutil.rmtree(tmp / CK / f"step{step:08d}")


def _config(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    """The template run, then `fn` on its config.yaml."""
    def do(tmp: Path) -> None:
        _copy(tmp, 0)
        fn(tmp / "run" / "config.yaml")
    return do


def _garble(path: Path) -> None:
    """A few bytes overwritten in the middle: no longer YAML (a disk, an editor, a bad copy)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 6] = b"\x00: [{"
    path.write_bytes(bytes(data))


def _says(*words: str) -> Callable[[Path, str, str], None]:
    def check(tmp: Path, out: str, err: str) -> None:
        for word in words:
            assert word in err, (word, err[-3000:])
    return check


def _moved_aside(tmp: Path, out: str, err: str) -> None:
    """The old run's files under run/replaced-TIME/, a new run beside them."""
    old = list((tmp / "run").glob("replaced-*"))
    assert len(old) == 1, sorted(p.name for p in (tmp / "run").iterdir())
    assert (old[0] / "checkpoints" / "step00000003" / "meta.json").is_file()
    assert (old[0] / "config.yaml").is_file() and (old[0] / "metrics.jsonl").is_file()
    assert (tmp / CK / "step00000001" / "meta.json").is_file()
    assert "moved to" in err


OVERWRITE = "train.overwrite=true"
OTHER_SHAPE = "model.d_model=64"  # the template's is 32

CASES = [
    # issue 24: a damaged config.yaml beside intact checkpoints: the fix offered keeps them
    Case("ckpt-config-yaml-garbled", train(), slow=True, setup=_config(_garble),
         words=("config.yaml", "not valid YAML", "3 complete checkpoint(s)", "step00000003",
                "move", "resumes the checkpoints"),
         unchanged=(*step_files(1, 2, 3), "run/config.yaml", "run/metrics.jsonl")),
    Case("ckpt-config-yaml-not-a-mapping", train(), slow=True,
         setup=_config(lambda p: p.write_text("just a line\n")),
         words=("config.yaml", "not written by `harness train`", "resumes the checkpoints"),
         unchanged=(*step_files(1, 2, 3), "run/config.yaml")),
    # ... and the fix works: without it, the same command resumes the newest checkpoint
    Case("ckpt-config-yaml-removed-resumes", train("train.max_steps=4"), exit_code=0, slow=True,
         process=True, setup=_config(lambda p: p.unlink()), unchanged=step_files(2, 3),
         check=_says("resumed from", "step00000003 at step 3")),
    # train.overwrite=true: a checkpoint of another model is moved aside, not refused
    Case("ckpt-other-shape-refused", train(OTHER_SHAPE), slow=True, setup=setup({}),
         words=("model.d_model=32, not 64", "step00000003", OVERWRITE, "replaced-TIME"),
         unchanged=(*step_files(1, 2, 3), "run/config.yaml", "run/metrics.jsonl")),
    Case("ckpt-other-shape-overwrite-moves-aside", train(OTHER_SHAPE, OVERWRITE), exit_code=0,
         slow=True, process=True, setup=setup({}), check=_moved_aside),
    # ... a run this config continues is continued, and the line says how to start anew
    Case("ckpt-overwrite-continues-its-own-run", train(OVERWRITE), exit_code=0, slow=True,
         process=True, setup=setup({}),
         unchanged=(*step_files(1, 2, 3), "run/metrics.jsonl"),
         check=_says("holds a run this config continues", "checkpoint.resume=never",
                     "nothing to do")),
    Case("ckpt-overwrite-resume-never-starts-anew", train(OVERWRITE, "checkpoint.resume=never"),
         exit_code=0, slow=True, process=True, setup=setup({}), check=_moved_aside),
    # checkpoint.resume=auto: the newest is damaged, the run goes on from an older one
    falls_back("ckpt-model-states-truncated", {3: [truncate(MS)]}),
    falls_back("ckpt-model-states-bit-flipped", {3: [flip(MS)]}),
    falls_back("ckpt-model-states-emptied", {3: [write(MS, b"")]}),
    falls_back("ckpt-model-states-deleted", {3: [delete(MS)]}),
    falls_back("ckpt-ds-dir-deleted", {3: [delete("ds")]}),
    falls_back("ckpt-meta-torn", {3: [truncate("meta.json")]}),
    falls_back("ckpt-meta-emptied", {3: [write("meta.json", b"")]}),
    falls_back("ckpt-meta-not-an-object", {3: [write("meta.json", b"[1, 2, 3]\n")]}),
    falls_back("ckpt-meta-binary-garbage", {3: [write("meta.json", bytes(range(256)))]}),
    falls_back("ckpt-meta-edited-valid-json", {3: [edit_meta]}),
    falls_back("ckpt-meta-deleted-save-incomplete", {3: [delete("meta.json")]}),
    falls_back("ckpt-rng-file-deleted", {3: [delete("rank0.pt")]}),
    falls_back("ckpt-rng-file-bit-flipped", {3: [flip("rank0.pt")]}),
    falls_back("ckpt-two-newest-damaged", {3: [delete("ds")], 2: [truncate("meta.json")]},
               intact=(1,)),
    falls_back("ckpt-earlier-set-aside-copy-kept", {3: [flip(MS)]}, then=_set_aside_before,
               also=(f"{CK}/corrupt-step00000003/note",)),
    falls_back("ckpt-stray-file-in-step-dir-ignored", {3: [write("notes.txt", b"mine\n")]},
               intact=(1, 2, 3), also=(f"{CK}/step00000003/notes.txt",)),
    falls_back("ckpt-zero1-optim-states-bit-flipped", {3: [flip(OPT1)]}, stage=1),
    falls_back("ckpt-zero1-optim-states-truncated", {3: [truncate(OPT1)]}, stage=1),
    falls_back("ckpt-zero1-optim-states-deleted", {3: [delete(OPT1)]}, stage=1),
    # saved before checksums existed: resumed unverified; structure still checked
    falls_back("ckpt-no-checksums-resumes-unverified", {3: [remove_step]}, legacy=True),
    falls_back("ckpt-no-checksums-rng-file-deleted", {3: [delete("rank0.pt")]}, legacy=True),
    falls_back("ckpt-no-checksums-ds-dir-deleted", {3: [delete("ds")]}, legacy=True),
    # checkpoint.resume names one: it resumes that one, or it is an error
    falls_back("ckpt-named-older-one-resumes", {3: [flip(MS)]}, extra=(NAMED2,)),
    refused("ckpt-named-bit-flipped", {3: [flip(MS)]}, extra=(NAMED3,),
            words=("checkpoint.resume=", "step00000003 is corrupt", "checksum mismatch",
                   "step00000002)", "checkpoint.resume=auto")),
    refused("ckpt-named-meta-torn", {3: [truncate("meta.json")]}, extra=(NAMED3,),
            words=("step00000003 is corrupt", "meta.json is torn", "step00000002)")),
    refused("ckpt-named-rng-file-deleted", {3: [delete("rank0.pt")]}, extra=(NAMED3,),
            words=("step00000003 is corrupt", "rank0.pt: missing", "step00000002)")),
    refused("ckpt-named-ds-dir-deleted", {3: [delete("ds")]}, extra=(NAMED3,),
            words=("step00000003 is corrupt", "ds/ is missing")),
    refused("ckpt-named-only-one-is-damaged", {1: [flip(MS)]}, then=_only_step1,
            extra=("checkpoint.resume={tmp}/" + CK + "/step00000001",),
            words=("step00000001 is corrupt", "restore an intact copy")),
    refused("ckpt-named-no-checksums-rng-file-deleted", {3: [delete("rank0.pt")]},
            extra=(NAMED3,), legacy=True,
            words=("step00000003 is corrupt", "rank0.pt: missing")),
    # nothing intact: one line naming the directory and what to do
    refused("ckpt-none-intact", {3: [flip(MS)], 2: [delete("rank0.pt")],
                                 1: [truncate("meta.json")]},
            words=("no intact checkpoint in", "/run/checkpoints", "step00000003 (",
                   "step00000002 (", "step00000001 (", "move")),
    refused("ckpt-none-intact-no-checksums", {s: [delete("ds")] for s in (1, 2, 3)},
            legacy=True, words=("no intact checkpoint in", "ds/ is missing")),
    # fast: refused while the config is read, before any engine exists
    Case("ckpt-named-nonexistent", train("checkpoint.resume={tmp}/nope/step00000009"),
         words=("checkpoint.resume=",)),
    Case("ckpt-named-dir-without-meta", train("checkpoint.resume={tmp}/step00000005"),
         setup=lambda tmp: (tmp / "step00000005" / "ds").mkdir(parents=True),
         words=("checkpoint.resume=", "meta.json")),
]

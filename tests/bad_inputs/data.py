"""Data, run directories, paths, report, replay, signals and W&B: the inputs and faults around a
run rather than its config values.

- data sources and shards: missing, FIFO, device, binary, empty, torn JSONL; a data.out_dir that
  is a file, a folder of the user's files, under /proc, or holds shards of other sources or
  settings (prepare-data and train both refuse, naming both and the fix); stale temp dirs;
- run directories: a file, under a file, under /proc, the user's own config.yaml, a folder of
  the user's files, another run's files, a checkpoint of another shape; the overwrite switch
  moves the previous run aside and touches nothing of the user's;
- `harness report` and `harness monitor replay` on broken, binary, ragged and NaN traces;
- Ctrl-C once (stop, save, exit 130) and twice (abort at once), a shard cut mid-run, W&B online
  with no server (offline fallback, no key written anywhere).

Refusals decided before an engine exists run in-process in milliseconds; those after the engine
build (reading the sources' content) and everything that trains are `slow` and run as their
own processes (an engine built after another one's process group was closed, in one process,
would trip on DeepSpeed's cached groups: a test artefact, each command being its own process).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bad_inputs import Case

TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32",
        "train.max_steps=2", "optim.warmup_steps=1", "data.eval_every=0"]
# the settings the word shards below are prepared with: a training config must say the same
WORD_DATA = ["data.vocab_size=300", "data.val_fraction=0.0"]
SHARDS = ("shards/manifest.json", "shards/train.bin", "shards/tokenizer.model")
OVERWRITE = "train.overwrite=true"  # harness.train.run_dir.OVERWRITE_KEY


# ---- setups ---------------------------------------------------------------------------------
def _words(tag: str = "word", lines: int = 20_000) -> str:
    return "".join(f"{tag}{i % 97} line{i % 13}\n" for i in range(lines))


def _files(**files: str | bytes):
    """name=text (names with __ for /, e.g. src__a_txt is not needed: use _file)."""
    def setup(tmp: Path) -> None:
        for name, text in files.items():
            _put(tmp / name.replace("__", "/"), text)
    return setup


def _put(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def _absent(*names: str):
    def check(tmp: Path, out: str, err: str) -> None:
        assert not [n for n in names if (tmp / n).exists()], "written before the refusal"
    return check


def _held_out_tail(tmp: Path, out: str, err: str) -> None:
    assert "(the last tokens of each document: a small corpus), 1 document," in out, out
    assert (tmp / "out" / "val.bin").stat().st_size > 0


def _file(name: str, text: str | bytes):
    return lambda tmp: _put(tmp / name, text)


def _dir(name: str):
    return lambda tmp: (tmp / name).mkdir(parents=True, exist_ok=True)


def _fifo(name: str):
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(tmp / name)
    return setup


def _socket(name: str):
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp / name))  # the socket file stays after close
    return setup


def _link(name: str, target: str):
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, tmp / name)
    return setup


def _chain(*setups):
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)
    return setup


def _shards(src: str = "a.txt", out: str = "shards", text: str | None = None, **kw):
    """tmp/src (20k lines of words) prepared into tmp/out: vocab 300, no validation split."""
    def setup(tmp: Path) -> None:
        from harness.config.data import DataConfig
        from harness.data.prepare import prepare_data

        if not (tmp / src).exists():
            _put(tmp / src, _words() if text is None else text)
        # max_bytes: the tiny preset's (the default --config of the commands below)
        cfg = dict(sources=[str(tmp / src)], out_dir=str(tmp / out), vocab_size=300,
                   val_fraction=0.0, max_bytes=4_000_000, **kw)
        prepare_data(DataConfig(**cfg), progress=False)
    return setup


def _builtin_shards(out: str = "stdlib"):
    def setup(tmp: Path) -> None:
        from harness.config.data import DataConfig
        from harness.data.prepare import prepare_data

        prepare_data(DataConfig(out_dir=str(tmp / out), max_bytes=200_000, vocab_size=512),
                     progress=False)
    return setup


def _edit(name: str, extra: str):
    def setup(tmp: Path) -> None:
        with open(tmp / name, "a") as f:
            f.write(extra)
    return setup


def _step_row(step: int, **extra) -> dict:
    return {"step": step, "train/loss": 5.0 - 0.01 * step, "optim/grad_norm_preclip": 1.0,
            "optim/clip_coef": 1.0, "optim/clipped": False, "optim/lr": 1e-3,
            "optim/skipped": False, "train/tokens_seen": 512 * step,
            "throughput/tokens_per_s": 1000.0, "throughput/step_time_s": 0.5, **extra}


def _metrics(name: str = "run/metrics.jsonl", steps: int = 40, **at_step):
    """A metrics.jsonl as `harness train` writes it; at_step: {"s35": {"train/loss": "nan"}}."""
    def setup(tmp: Path) -> None:
        rows = [_step_row(s, **at_step.get(f"s{s}", {})) for s in range(1, steps + 1)]
        _put(tmp / name, "".join(json.dumps(r) + "\n" for r in rows))
    return setup


def _run_config(run: str = "run", *overrides: str, header: bool = True):
    """run/config.yaml as `harness train` writes it (header: as this version writes it), for
    the TINY model unless `overrides` say otherwise."""
    def setup(tmp: Path) -> None:
        from harness.config import load_config, to_yaml
        from harness.train.run_dir import CONFIG_HEADER

        text = to_yaml(load_config("tiny", [*TINY, *WORD_DATA, *overrides]))
        _put(tmp / run / "config.yaml", (CONFIG_HEADER if header else "") + text)
    return setup


def _fake_checkpoint(root: str = "run/checkpoints", step: int = 2):
    def setup(tmp: Path) -> None:
        _put(tmp / root / f"step{step:08d}" / "meta.json",
             json.dumps({"step": step, "consumed_samples": 32, "world_size": 1}))
    return setup


# ---- checks after a case ----------------------------------------------------------------------
def _says(*words: str, absent: tuple[str, ...] = ()):
    """Every word somewhere in stdout or stderr; none of `absent` in the error line."""
    def check(tmp: Path, out: str, err: str) -> None:
        text = out + err
        for w in words:
            assert w in text, (w, text[-3000:])
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        for w in absent:
            assert all(w not in ln for ln in errors), (w, errors)
    return check


def _exists(*paths: str, gone: tuple[str, ...] = ()):
    def check(tmp: Path, out: str, err: str) -> None:
        for p in paths:
            assert list(tmp.glob(p)), (p, sorted(str(x.relative_to(tmp)) for x in tmp.rglob("*")))
        for p in gone:
            assert not list(tmp.glob(p)), (p, list(tmp.glob(p)))
    return check


def _all(*checks):
    def check(tmp: Path, out: str, err: str) -> None:
        for c in checks:
            c(tmp, out, err)
    return check


def _events(*kinds: str):
    def check(tmp: Path, out: str, err: str) -> None:
        got = [json.loads(ln)["event"] for ln in out.splitlines() if ln.startswith("{")]
        for kind in kinds:
            assert kind in got, (kind, got)
    return check


NO_DELETE = _says(absent=("delete", "remove"))


# ---- while a process case runs --------------------------------------------------------------
def _wait_for_steps(tmp: Path, proc, metrics: str = "run/metrics.jsonl", steps: int = 1,
                    timeout: float = 240) -> None:
    path, end = tmp / metrics, time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"ended early with {proc.returncode}: "
                                 f"{proc.stderr.read()[-3000:]}")
        if path.is_file() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step in {path} after {timeout} s")


def _ctrl_c_once(proc, tmp: Path) -> None:
    _wait_for_steps(tmp, proc)
    proc.send_signal(signal.SIGINT)


def _ctrl_c_twice(proc, tmp: Path) -> None:
    _wait_for_steps(tmp, proc)
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # the first one is handled (and said so) before the second
        if line.startswith("Ctrl-C"):
            break
    proc.send_signal(signal.SIGINT)


def _cut_shard(proc, tmp: Path) -> None:
    _wait_for_steps(tmp, proc)
    path = tmp / "shards" / "train.bin"
    os.truncate(path, path.stat().st_size // 4)


# ---- the W&B case: online, no server; the key must be written nowhere ----------------------
WANDB_KEY = secrets.token_hex(20)


def _key_written_nowhere(tmp: Path, out: str, err: str) -> None:
    assert WANDB_KEY not in out + err
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert WANDB_KEY.encode() not in path.read_bytes(), path


def _offline_run_kept(tmp: Path, out: str, err: str) -> None:
    assert list((tmp / "run" / "wandb").glob("offline-run-*")), err[-3000:]
    # one warning of ours (wandb's own summary repeats the `wandb sync` hint at the end)
    lines = [ln for ln in err.splitlines() if "wandb sync" in ln and "harness" in ln]
    assert len(lines) == 1 and "offline-run-" in lines[0], err[-3000:]


def _this_host() -> str:
    from harness.data.out_dir import owner_tag

    return owner_tag().partition("@")[2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_dir(owner: str, age_s: float = 0):
    def setup(tmp: Path) -> None:
        name = owner.replace("HOST", _this_host()).replace("DEAD", str(_dead_pid()))
        d = tmp / f".shards.tmp-0123456789ab-{name}"
        _put(d / "train.bin", b"\0" * 64)
        if age_s:
            old = time.time() - age_s
            for p in (d / "train.bin", d):
                os.utime(p, (old, old))
    return setup


def _report_rows(*rows: dict | str | bytes):
    def setup(tmp: Path) -> None:
        lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in rows]
        if any(isinstance(x, bytes) for x in lines):
            _put(tmp / "run" / "metrics.jsonl", b"\n".join(
                x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
        else:
            _put(tmp / "run" / "metrics.jsonl", "\n".join(lines) + "\n")
    return setup


TRAIN = ["train", *TINY, *WORD_DATA, "train.run_dir={tmp}/run", "data.out_dir={tmp}/shards"]
TRAIN_A = [*TRAIN, "data.sources=[{tmp}/a.txt]"]
PREP = ["prepare-data", "data.vocab_size=300", "data.val_fraction=0.0"]
USER_CONFIG = "# my experiment: one layer\nmodel:\n  n_layer: 1  # small\n"
BINARY = bytes(range(256)) * 8

CASES: list[Case] = [
    # ---- prepare-data: sources ----------------------------------------------------------------
    Case("data-source-missing", [*PREP, "data.sources=[{tmp}/nope.txt]",
                                 "data.out_dir={tmp}/out"], ("nope.txt", "does not exist")),
    Case("data-source-fifo", [*PREP, "data.sources=[{tmp}/pipe]", "data.out_dir={tmp}/out"],
         ("pipe", "a FIFO", "data.sources"), setup=_fifo("pipe")),
    Case("data-source-socket", [*PREP, "data.sources=[{tmp}/sock]", "data.out_dir={tmp}/out"],
         ("sock", "a socket"), setup=_socket("sock")),
    Case("data-source-device", [*PREP, "data.sources=[/dev/null]", "data.out_dir={tmp}/out"],
         ("/dev/null", "character device")),
    Case("data-source-fifo-in-dir-skipped", [*PREP, "data.sources=[{tmp}/src]",
                                             "data.out_dir={tmp}/out"], exit_code=0,
         setup=_chain(_file("src/a.txt", _words()), _fifo("src/pipe"), _socket("src/sock"),
                      _link("src/dead", "nowhere")),
         unchanged=("src/a.txt",), check=_exists("out/manifest.json")),
    Case("data-source-binary-named", [*PREP, "data.sources=[{tmp}/img.bin]",
                                      "data.out_dir={tmp}/out"], ("img.bin", "not UTF-8"),
         setup=_file("img.bin", BINARY), unchanged=("img.bin",)),
    Case("data-source-empty-dir", [*PREP, "data.sources=[{tmp}/src]", "data.out_dir={tmp}/out"],
         ("no documents found",), setup=_dir("src")),
    Case("data-source-only-binary", [*PREP, "data.sources=[{tmp}/src]",
                                     "data.out_dir={tmp}/out"], ("no documents found",),
         setup=_file("src/x.bin", BINARY)),
    Case("data-source-empty-file", [*PREP, "data.sources=[{tmp}/e.txt]",
                                    "data.out_dir={tmp}/out"], ("no documents found",),
         setup=_file("e.txt", "")),
    Case("data-source-torn-jsonl", [*PREP, "data.sources=[{tmp}/d.jsonl]",
                                    "data.out_dir={tmp}/out"], ("d.jsonl:2", "not a JSON line"),
         setup=_file("d.jsonl", '{"text": "ok"}\n{"text": "cut\n{"text": "x"}\n')),
    Case("data-source-jsonl-no-field", [*PREP, "data.sources=[{tmp}/d.jsonl]",
                                        "data.out_dir={tmp}/out"],
         ("d.jsonl:1", "no string field 'text'", "data.jsonl_text_field"),
         setup=_file("d.jsonl", '{"body": "text here"}\n')),
    Case("data-source-jsonl-array", [*PREP, "data.sources=[{tmp}/d.jsonl]",
                                     "data.out_dir={tmp}/out"], ("d.jsonl:1", "no string field"),
         setup=_file("d.jsonl", '["text", "here"]\n')),
    Case("data-source-jsonl-number-text", [*PREP, "data.sources=[{tmp}/d.jsonl]",
                                           "data.out_dir={tmp}/out"], ("no string field",),
         setup=_file("d.jsonl", '{"text": 42}\n')),
    Case("data-source-dead-link", [*PREP, "data.sources=[{tmp}/dead.txt]",
                                   "data.out_dir={tmp}/out"], ("dead.txt", "does not exist"),
         setup=_link("dead.txt", "nowhere.txt")),
    Case("data-source-max-bytes-too-small", [*PREP, "data.sources=[{tmp}/a.txt]",
                                             "data.out_dir={tmp}/out", "data.max_bytes=3"],
         ("no documents found", "data.max_bytes"), setup=_file("a.txt", _words())),
    Case("data-tokenizer-model-missing", [*PREP, "data.sources=[{tmp}/a.txt]",
                                          "data.out_dir={tmp}/out",
                                          "data.tokenizer_model={tmp}/none.model"],
         ("data.tokenizer_model", "none.model", "not a file"), setup=_file("a.txt", "text")),
    Case("data-tokenizer-model-not-spm", [*PREP, "data.sources=[{tmp}/a.txt]",
                                          "data.out_dir={tmp}/out",
                                          "data.tokenizer_model={tmp}/a.txt"],
         ("data.tokenizer_model", "not a sentencepiece model"), setup=_file("a.txt", "text"),
         unchanged=("a.txt",)),
    Case("data-vocab-too-large-for-text", ["prepare-data", "data.sources=[{tmp}/a.txt]",
                                           "data.out_dir={tmp}/out", "data.vocab_size=5000",
                                           "data.val_fraction=0.0"],
         ("data.vocab_size=5000", "<="), setup=_file("a.txt", "tiny text " * 50)),
    # a large preset names the data it needs: refused before any engine or directory exists
    Case("data-large-preset-toy-corpus", ["train", "--config", "gpt2-small",
                                          "train.run_dir={tmp}/run", "data.out_dir={tmp}/d"],
         ("data.sources", "data.allow_toy_corpus=true"), check=_absent("run", "d")),
    # a one-document corpus holds out the last tokens of that document (nanoGPT's split)
    Case("data-val-fraction-one-document", ["prepare-data", "data.sources=[{tmp}/a.txt]",
                                            "data.out_dir={tmp}/out", "data.vocab_size=300"],
         exit_code=0, setup=_file("a.txt", _words()), unchanged=("a.txt",),
         check=_held_out_tail),

    # ---- prepare-data: data.out_dir -----------------------------------------------------------
    Case("data-out-dir-is-file", [*PREP, "data.sources=[{tmp}/a.txt]", "data.out_dir={tmp}/f"],
         ("data.out_dir=", "is a file", "choose another data.out_dir"),
         setup=_chain(_file("a.txt", _words()), _file("f", "my notes")), unchanged=("f",),
         check=NO_DELETE),
    Case("data-out-dir-under-file", [*PREP, "data.sources=[{tmp}/a.txt]",
                                     "data.out_dir={tmp}/f/shards"],
         ("f is a file, not a directory",),
         setup=_chain(_file("a.txt", _words()), _file("f", "my notes")), unchanged=("f",)),
    Case("data-out-dir-user-files", [*PREP, "data.sources=[{tmp}/a.txt]",
                                     "data.out_dir={tmp}/mine"],
         ("not token shards", "choose another data.out_dir"),
         setup=_chain(_file("a.txt", _words()), _file("mine/notes.txt", "keep me")),
         unchanged=("mine/notes.txt",), check=_all(NO_DELETE, _exists(gone=(".mine.tmp-*",)))),
    Case("data-out-dir-proc", [*PREP, "data.sources=[{tmp}/a.txt]",
                               "data.out_dir=/proc/harness-shards"],
         ("data.out_dir=/proc/harness-shards", "cannot write"), setup=_file("a.txt", _words())),
    Case("data-out-dir-other-sources", [*PREP, "data.sources=[{tmp}/b.txt]",
                                        "data.out_dir={tmp}/shards"],
         ("b.txt", "a.txt", "harness prepare-data", "another data.out_dir"),
         setup=_chain(_shards(), _file("b.txt", _words("other"))), unchanged=SHARDS,
         check=NO_DELETE),
    Case("data-out-dir-other-vocab", ["prepare-data", "data.sources=[{tmp}/a.txt]",
                                      "data.out_dir={tmp}/shards", "data.vocab_size=400",
                                      "data.val_fraction=0.0"],
         ("data.vocab_size=400", "data.vocab_size=300"), setup=_shards(), unchanged=SHARDS),
    Case("data-out-dir-other-seed", [*PREP, "data.sources=[{tmp}/a.txt]",
                                     "data.out_dir={tmp}/shards", "data.seed=7"],
         ("data.seed=7", "data.seed=1234"), setup=_shards(), unchanged=SHARDS),
    Case("data-out-dir-other-tokenizer-type", [*PREP, "data.sources=[{tmp}/a.txt]",
                                               "data.out_dir={tmp}/shards",
                                               "data.tokenizer_type=unigram"],
         ("data.tokenizer_type=unigram", "bpe"), setup=_shards(), unchanged=SHARDS),
    Case("data-out-dir-edited-source", [*PREP, "data.sources=[{tmp}/a.txt]",
                                        "data.out_dir={tmp}/shards"],
         ("changed since", "a.txt"), setup=_chain(_shards(), _edit("a.txt", "one more\n")),
         unchanged=SHARDS),
    Case("data-out-dir-torn-manifest", [*PREP, "data.sources=[{tmp}/a.txt]",
                                        "data.out_dir={tmp}/shards"],
         ("manifest.json is not valid JSON",),
         setup=_chain(_shards(), _file("shards/manifest.json", '{"format_version": 1,')),
         unchanged=("shards/manifest.json", "shards/train.bin")),
    Case("data-out-dir-manifest-list", [*PREP, "data.sources=[{tmp}/a.txt]",
                                        "data.out_dir={tmp}/shards"],
         ("not a format 1 manifest",),
         setup=_chain(_shards(), _file("shards/manifest.json", "[]")), unchanged=SHARDS),
    Case("data-out-dir-truncated-shard", [*PREP, "data.sources=[{tmp}/a.txt]",
                                          "data.out_dir={tmp}/shards"],
         ("train.bin", "truncated or corrupt"),
         setup=_chain(_shards(), lambda t: os.truncate(t / "shards/train.bin", 1000))),
    Case("data-out-dir-same-inputs-is-a-noop", [*PREP, "data.sources=[{tmp}/a.txt]",
                                                "data.out_dir={tmp}/shards"], exit_code=0,
         setup=_shards(), unchanged=SHARDS),
    Case("data-stale-temp-dir-removed", [*PREP, "data.sources=[{tmp}/a.txt]",
                                         "data.out_dir={tmp}/shards"], exit_code=0,
         setup=_chain(_shards(), _temp_dir("DEAD@HOST")), unchanged=SHARDS,
         check=_exists(gone=(".shards.tmp-*",))),
    Case("data-old-temp-dir-removed", [*PREP, "data.sources=[{tmp}/a.txt]",
                                       "data.out_dir={tmp}/shards"], exit_code=0,
         setup=_chain(_shards(), _temp_dir("1@elsewhere", age_s=3 * 86400)),
         check=_exists(gone=(".shards.tmp-*",))),
    Case("data-live-temp-dir-kept", [*PREP, "data.sources=[{tmp}/a.txt]",
                                     "data.out_dir={tmp}/shards"], exit_code=0,
         setup=_chain(_shards(), _temp_dir(f"{os.getpid()}@HOST")),
         check=_exists(".shards.tmp-*")),

    # ---- train: the shards must be the configured ones ----------------------------------------
    Case("data-train-shards-other-vocab", [*TRAIN_A, "data.vocab_size=400"],
         ("data.vocab_size=400", "data.vocab_size=300", "prepare-data"),
         setup=_shards(), unchanged=SHARDS, check=_exists(gone=("run",))),
    Case("data-train-shards-other-seed", [*TRAIN_A, "data.seed=5"],
         ("data.seed=5", "data.seed=1234"),
         setup=_shards(), unchanged=SHARDS),
    Case("data-train-shards-other-val-fraction", [*TRAIN_A, "data.val_fraction=0.1"],
         ("data.val_fraction=0.1", "data.val_fraction=0.0"), setup=_shards(), unchanged=SHARDS),
    Case("data-train-shards-given-vs-trained-tokenizer",
         [*TRAIN_A, "data.tokenizer_model={tmp}/shards/tokenizer.model"],
         ("data.tokenizer_model=", "trained bpe tokenizer of 300 pieces"), setup=_shards(),
         unchanged=SHARDS),
    Case("data-train-builtin-shards-other-vocab", ["train", *TINY, "train.run_dir={tmp}/run",
                                              "data.out_dir={tmp}/stdlib",
                                              "data.vocab_size=1024"],
         ("data.vocab_size=1024", "data.vocab_size=512"), setup=_builtin_shards(),
         unchanged=("stdlib/manifest.json", "stdlib/train.bin")),
    Case("data-train-shards-missing-source", [*TRAIN, "data.sources=[{tmp}/gone.txt]"],
         ("gone.txt", "does not exist"), setup=_shards(), unchanged=SHARDS),
    Case("data-train-shards-torn-manifest", TRAIN_A, ("manifest.json is not valid JSON",),
         setup=_chain(_shards(), _file("shards/manifest.json", "{")),
         unchanged=("shards/manifest.json",)),
    Case("data-train-out-dir-is-file", [*TRAIN, "data.out_dir={tmp}/f"], ("is a file",),
         setup=_file("f", "mine"), unchanged=("f",), check=NO_DELETE),
    Case("data-train-out-dir-user-files", [*TRAIN, "data.out_dir={tmp}/mine"],
         ("not token shards",), setup=_file("mine/notes.txt", "keep"),
         unchanged=("mine/notes.txt",), check=_all(NO_DELETE, _exists(gone=("run",)))),
    Case("data-train-out-dir-proc", [*TRAIN, "data.out_dir=/proc/harness-shards"],
         ("data.out_dir=/proc/harness-shards", "cannot write")),
    Case("data-train-shards-other-sources", [*TRAIN, "data.sources=[{tmp}/b.txt]"],
         ("data.sources=", "b.txt", "a.txt", "harness prepare-data", "another data.out_dir"),
         setup=_chain(_shards(), _file("b.txt", _words("other"))),
         unchanged=(*SHARDS, "b.txt"), slow=True, process=True),
    Case("data-train-shards-edited-source", TRAIN_A, ("changed since", "a.txt", "prepare-data"),
         setup=_chain(_shards(), _edit("a.txt", "one more line\n")),
         unchanged=(*SHARDS, "a.txt"), slow=True, process=True),

    # ---- train: paths, checked before any engine is built -------------------------------------
    Case("data-run-dir-is-file", [*TRAIN_A, "train.run_dir={tmp}/f"],
         ("train.run_dir=", "is a file, not a directory"), setup=_chain(_shards(), _file("f", "x")),
         unchanged=("f",)),
    Case("data-run-dir-under-file", [*TRAIN_A, "train.run_dir={tmp}/f/run"],
         ("f is a file, not a directory", "train.run_dir"),
         setup=_chain(_shards(), _file("f", "x")), unchanged=("f",)),
    Case("data-run-dir-proc", [*TRAIN_A, "train.run_dir=/proc/harness-run"],
         ("train.run_dir=/proc/harness-run", "cannot write"), setup=_shards()),
    Case("data-run-dir-blank", [*TRAIN_A, "train.run_dir="], ("train.run_dir",), setup=_shards()),
    Case("data-checkpoint-dir-proc", [*TRAIN_A, "checkpoint.dir=/proc/harness-ckpt"],
         ("checkpoint.dir=/proc/harness-ckpt", "cannot write"), setup=_shards(),
         check=_exists(gone=("run",))),
    Case("data-checkpoint-dir-is-file", [*TRAIN_A, "checkpoint.dir={tmp}/f"],
         ("checkpoint.dir=", "is a file"), setup=_chain(_shards(), _file("f", "x")),
         unchanged=("f",)),
    Case("data-wandb-dir-proc", [*TRAIN_A, "wandb.mode=offline", "wandb.dir=/proc/harness-wandb"],
         ("wandb.dir=/proc/harness-wandb", "cannot write"), setup=_shards()),

    # ---- train: whose run directory is it? ----------------------------------------------------
    Case("data-run-dir-users-config-dot", ["train", "--config", "config.yaml", *TINY, *WORD_DATA,
                                      "train.run_dir=.", "data.out_dir={tmp}/shards"],
         ("config.yaml", "not written by `harness train`", "train.run_dir="),
         setup=_chain(_shards(), _file("config.yaml", USER_CONFIG)),
         unchanged=("config.yaml",), check=_exists(gone=("metrics.jsonl", "ds_config.json"))),
    Case("data-run-dir-users-config-even-with-overwrite", [*TRAIN_A, OVERWRITE],
         ("not written by `harness train`",),
         setup=_chain(_shards(), _file("run/config.yaml", USER_CONFIG)),
         unchanged=("run/config.yaml",),
         check=_exists(gone=("run/replaced-*",))),
    Case("data-submit-into-another-run",
         ["submit", "--dry-run", "train.run_dir={tmp}/run", "data.out_dir={tmp}/shards"],
         ("holds another run", "train.overwrite=true"),
         setup=_chain(_run_config("run", "model.d_model=64"), _metrics()),
         unchanged=("run/config.yaml", "run/metrics.jsonl"),
         check=_exists(gone=("run/job_config.yaml", "run/train.sbatch"))),
    Case("data-run-dir-broken-config", TRAIN_A, ("config.yaml", "not valid YAML"),
         setup=_chain(_shards(), _file("run/config.yaml", "model: {n_layer: [\n")),
         unchanged=("run/config.yaml",)),
    Case("data-run-dir-user-files", TRAIN_A, ("not empty", "notes.txt", OVERWRITE),
         setup=_chain(_shards(), _file("run/notes.txt", "mine"), _file("run/src/x.py", "x")),
         unchanged=("run/notes.txt", "run/src/x.py"), check=_exists(gone=("run/config.yaml",))),
    Case("data-run-dir-other-run-no-checkpoint", TRAIN_A,
         ("holds another run", "model.d_model=64, not 32", OVERWRITE),
         setup=_chain(_shards(), _run_config("run", "model.d_model=64"), _metrics(),
                      _file("run/report.png", b"png")),
         unchanged=("run/config.yaml", "run/metrics.jsonl", "run/report.png")),
    Case("data-run-dir-other-run-legacy-config", TRAIN_A, ("holds another run", "model.d_model"),
         setup=_chain(_shards(), _run_config("run", "model.d_model=64", header=False),
                      _metrics()),
         unchanged=("run/config.yaml", "run/metrics.jsonl")),
    Case("data-run-dir-metrics-only", TRAIN_A, ("holds another run", "metrics.jsonl"),
         setup=_chain(_shards(), _metrics()), unchanged=("run/metrics.jsonl",)),
    Case("data-run-dir-resume-never", [*TRAIN_A, "checkpoint.resume=never"],
         ("checkpoint.resume=never", "checkpoint.resume=auto"),
         setup=_chain(_shards(), _run_config("run"), _metrics(),
                      _fake_checkpoint()),
         unchanged=("run/config.yaml", "run/metrics.jsonl",
                    "run/checkpoints/step00000002/meta.json")),
    Case("data-run-dir-checkpoint-of-other-shape", TRAIN_A, ("model.d_model=64, not 32",),
         setup=_chain(_shards(), _run_config("run", "model.d_model=64"), _metrics(),
                      _fake_checkpoint()),
         unchanged=("run/config.yaml", "run/metrics.jsonl")),
    Case("data-resume-path-other-run-shape", [*TRAIN_A, "train.run_dir={tmp}/new",
                                         "checkpoint.resume={tmp}/other/checkpoints/step00000002"],
         ("checkpoint.resume=", "model.d_model=64, not 32"),
         setup=_chain(_shards(), _run_config("other", "model.d_model=64"),
                      _fake_checkpoint("other/checkpoints")),
         unchanged=("other/config.yaml",), check=_exists(gone=("new",))),

    # ---- report ---------------------------------------------------------------------------------
    Case("data-report-missing-dir", ["report", "{tmp}/none"], ("metrics.jsonl not found",)),
    Case("data-report-run-dir-is-file", ["report", "{tmp}/f"], ("not found",),
         setup=_file("f", "x")),
    Case("data-report-binary-metrics", ["report", "{tmp}/run"], ("metrics.jsonl", "not UTF-8"),
         setup=_file("run/metrics.jsonl", BINARY), unchanged=("run/metrics.jsonl",),
         check=_exists(gone=("run/report.png",))),
    Case("data-report-no-tokens-seen", ["report", "{tmp}/run"],
         ("lacks train/tokens_seen", "not a metrics.jsonl"),
         setup=_report_rows(*[{k: v for k, v in _step_row(s).items() if k != "train/tokens_seen"}
                              for s in (1, 2)])),
    Case("data-report-broken-config", ["report", "{tmp}/run"],
         ("config.yaml", "not a readable YAML"),
         setup=_chain(_metrics(), _file("run/config.yaml", "clip: {max_norm: [\n")),
         unchanged=("run/config.yaml",)),
    Case("data-report-binary-config", ["report", "{tmp}/run"], ("config.yaml",),
         setup=_chain(_metrics(), _file("run/config.yaml", BINARY)),
         unchanged=("run/config.yaml",)),
    Case("data-report-config-max-norm-text", ["report", "{tmp}/run"],
         ("clip.max_norm", "not a number"),
         setup=_chain(_metrics(), _file("run/config.yaml", "clip: {max_norm: lots}\n"))),
    Case("data-report-array-line", ["report", "{tmp}/run"],
         ("metrics.jsonl:2", "not a JSON object"),
         setup=_report_rows(_step_row(1), "[1, 2]", _step_row(3))),
    Case("data-report-bad-middle-line", ["report", "{tmp}/run"],
         ("metrics.jsonl:2", "not a JSON line"),
         setup=_report_rows(_step_row(1), "{oops", _step_row(3))),
    Case("data-report-no-steps", ["report", "{tmp}/run"], ("no training steps",),
         setup=_report_rows({"step": 1, "event": "grad_spike"})),
    Case("data-report-step-not-a-number", ["report", "{tmp}/run"], ("step", "not a number"),
         setup=_report_rows({**_step_row(1), "step": "abc"})),
    Case("data-report-loss-text", ["report", "{tmp}/run"], ("train/loss", "not a number"),
         setup=_report_rows(_step_row(1, **{"train/loss": "low"}))),
    Case("data-report-nan-loss-is-fine", ["report", "{tmp}/run"], exit_code=0,
         setup=_metrics(s7={"train/loss": "nan", "optim/grad_norm_preclip": "inf"}),
         unchanged=("run/metrics.jsonl",), check=_all(_exists("run/report.png"),
                                                      _says("steps 40"))),

    # ---- monitor replay -----------------------------------------------------------------------
    Case("data-replay-nan-strings", ["monitor", "replay", "{tmp}/run/metrics.jsonl"], exit_code=0,
         setup=_metrics(s35={"train/loss": "nan"}), check=_events("nonfinite")),
    Case("data-replay-inf-strings", ["monitor", "replay", "{tmp}/run/metrics.jsonl"], exit_code=0,
         setup=_metrics(s12={"optim/grad_norm_preclip": "inf"}, s13={"train/loss": "-inf"}),
         check=_all(_events("nonfinite"), _says('"value": "inf"', '"value": "-inf"'))),
    Case("data-replay-csv-short-row", ["monitor", "replay", "{tmp}/t.csv"],
         ("t.csv:3", "2 cells", "header has 3"),
         setup=_file("t.csv", "step,loss,grad_norm\n1,3.0,1.0\n2,3.0\n3,3.0,1.0\n")),
    Case("data-replay-csv-long-row", ["monitor", "replay", "{tmp}/t.csv"],
         ("t.csv:2", "4 cells", "header has 3"),
         setup=_file("t.csv", "step,loss,grad_norm\n1,3.0,1.0,9\n")),
    Case("data-replay-binary", ["monitor", "replay", "{tmp}/t.bin"], ("cannot read trace",),
         setup=_file("t.bin", BINARY)),
    Case("data-replay-directory", ["monitor", "replay", "{tmp}"], ("cannot read trace",)),
    Case("data-replay-missing", ["monitor", "replay", "{tmp}/none.jsonl"], ("cannot read trace",)),
    Case("data-replay-empty", ["monitor", "replay", "{tmp}/t.csv"], ("is empty",),
         setup=_file("t.csv", "\n\n")),
    Case("data-replay-csv-no-step", ["monitor", "replay", "{tmp}/t.csv"], ("'step' column",),
         setup=_file("t.csv", "loss,grad_norm\n3,1\n")),
    Case("data-replay-csv-text-cell", ["monitor", "replay", "{tmp}/t.csv"],
         ("t.csv:2", "'loss'", "not a number"), setup=_file("t.csv", "step,loss\n1,abc\n")),
    Case("data-replay-jsonl-torn-line", ["monitor", "replay", "{tmp}/m.jsonl"],
         ("m.jsonl:2", "not valid JSON"), setup=_file("m.jsonl", '{"step": 1}\n{oops\n')),
    Case("data-replay-jsonl-array", ["monitor", "replay", "{tmp}/m.jsonl"],
         ("m.jsonl:1", "JSON object"), setup=_file("m.jsonl", '[1, 2]\n')),
    Case("data-replay-step-fraction", ["monitor", "replay", "{tmp}/t.csv"], ("not an integer",),
         setup=_file("t.csv", "step,loss\n1.5,3\n")),
    Case("data-replay-no-steps", ["monitor", "replay", "{tmp}/m.jsonl"], ("no records",),
         setup=_file("m.jsonl", '{"loss": 1}\n')),

    # ---- faults while training (separate processes) ------------------------------------------
    Case("data-ctrl-c-saves-and-exits-130", [*TRAIN_A, "train.max_steps=100000",
                                        "checkpoint.every=0"], exit_code=130,
         setup=_shards(), unchanged=SHARDS, slow=True, process=True, during=_ctrl_c_once,
         check=_all(_exists("run/checkpoints/step*/meta.json"),
                    _says("Ctrl-C: stopping after this step", "interrupted at step"))),
    Case("data-ctrl-c-twice-aborts-at-once", [*TRAIN_A, "train.max_steps=100000",
                                         "checkpoint.every=0"], exit_code=-signal.SIGINT,
         setup=_shards(), unchanged=SHARDS, slow=True, process=True, during=_ctrl_c_twice),
    Case("data-shard-cut-mid-run", [*TRAIN_A, "train.max_steps=100000"],
         ("train.bin", "cut while training", "prepare-data"), setup=_shards(), slow=True,
         process=True, during=_cut_shard),
    Case("data-wandb-online-without-server-goes-offline",
         [*TRAIN_A, "wandb.mode=online", "wandb.init_timeout_s=1"], exit_code=0,
         setup=_shards(), unchanged=SHARDS, slow=True, process=True,
         env={"WANDB_API_KEY": WANDB_KEY, "WANDB_BASE_URL": "http://127.0.0.1:9",
              "WANDB_MODE": "online", "WANDB_CONFIG_DIR": "{tmp}/wandb-config",
              "WANDB_CACHE_DIR": "{tmp}/wandb-cache", "WANDB_DATA_DIR": "{tmp}/wandb-data"},
         check=_all(_offline_run_kept, _key_written_nowhere, _exists("run/metrics.jsonl"))),
    # a W&B service token inherited from the parent (its service, not this run's: here one
    # that does not exist) is not used; without that, wandb.init fails or, with a live parent
    # service, holds the run id the restart after SIGTERM needs (tests/slurm/test_slurm_train.py)
    Case("data-wandb-inherited-service-not-used",
         [*TRAIN_A, "wandb.mode=offline"], exit_code=0, setup=_shards(), unchanged=SHARDS,
         slow=True, process=True,
         env={"WANDB_SERVICE": "3-1-tcp-localhost-9", "WANDB_MODE": "offline",
              "WANDB_CONFIG_DIR": "{tmp}/wandb-config", "WANDB_CACHE_DIR": "{tmp}/wandb-cache",
              "WANDB_DATA_DIR": "{tmp}/wandb-data"},
         check=_exists("run/wandb/offline-run-*/run-*.wandb", "run/metrics.jsonl")),
    Case("data-overwrite-moves-the-old-run-aside",
         [*TRAIN_A, "slurm.output=logs/slurm-%j.out", OVERWRITE], exit_code=0, slow=True, process=True,
         setup=_chain(_shards(), _run_config("run", "model.d_model=64"), _metrics(),
                      _file("run/notes.txt", "mine"), _file("run/job_config.yaml", "x: 1\n"),
                      _file("run/train.sbatch", "#!/bin/bash\n"),
                      _file("run/logs/slurm-7.out", "log\n")),
         unchanged=("run/notes.txt", "run/job_config.yaml", "run/train.sbatch",
                    "run/logs/slurm-7.out", *SHARDS),
         check=_all(_exists("run/replaced-*/metrics.jsonl", "run/replaced-*/config.yaml",
                            "run/metrics.jsonl", "run/checkpoints/step00000002/meta.json"),
                    _says("moved to"))),
]

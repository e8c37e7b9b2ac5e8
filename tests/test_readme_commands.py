"""Every command in README.md's ```bash blocks runs, and says what the README says it does.

The commands are read from the file: one that no entry below knows fails the test, so a block
added to the README is covered (or listed with the reason it cannot run here) from the start.
Each known command has its claim, a phrase the comment beside it in the README must still
hold, and a check of its output against that claim. A changed comment fails until the check
is revisited.

One run serves every command that reads a run: `make train`'s own command (the Makefile's
recipe, checked with `make -n`) in a fresh process in a temporary directory, as a user runs it
from the checkout: the tiny preset, 60 steps on the built-in corpus. Then the same command
again, which the README says does nothing. The commands after it run in-process
(harness.cli.main) on small settings: SMALL adds flags that shorten them, never others.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from engine_utils import child_env

from harness.cli import main
from harness.config import load_config

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ".venv/bin/harness"  # the README's spelling of the installed command

# commands that cannot run inside the suite, and why
NOT_RUN = {
    "make test": "the whole suite, this test included",
    "python3 -m venv .venv": "the GPU set-up: a venv for a CUDA torch (make train's own install "
                             "step creates it the same way; measured on a fresh clone)",
    ".venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu124":
        "a CUDA build of torch: multi-GB, needs the network and a GPU",
}
# flags added to a README command here, to make it short: they change how much, not what
SMALL = {"sample": ["--max-new-tokens", "12"]}


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(command, the comment beside it) for each line of each ```bash block."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            command, _, comment = line.partition("#")
            if command.strip():
                out.append((" ".join(command.split()), comment.strip()))
    return out


COMMANDS = readme_commands((ROOT / "README.md").read_text())


# ---- the run: `make train`, twice ---------------------------------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """`make train`'s command in a fresh process from a directory of its own, then again."""
    recipe = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed", "train"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    assert recipe == [f"{HARNESS}", "train"], recipe  # what the stand-in below runs
    home = tmp_path_factory.mktemp("checkout")
    runs, texts = [], []
    for _ in range(2):
        runs.append(subprocess.run([sys.executable, "-m", "harness.cli", "train"], cwd=home,
                                   capture_output=True, text=True, timeout=900, env=child_env()))
        metrics = home / "runs" / "tiny" / "metrics.jsonl"
        texts.append(metrics.read_text() if metrics.is_file() else None)
    return home, runs, texts


def _metrics(run: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "train/loss" in m]


def check_make_train(made, capsys):
    """The tiny preset, 60 steps into runs/tiny on the built-in corpus (prepared into
    data/stdlib with a 512-piece tokenizer), every phase announced in order; the same command
    again finds the run complete and changes nothing."""
    home, (first, again), (after_first, after_again) = made
    assert first.returncode == 0, first.stderr[-3000:]
    heads = [ln.split()[0].rstrip(":") for ln in first.stdout.splitlines() if ln.strip()]
    phases = [h for i, h in enumerate(heads) if h in ("engine", "data", "run", "step", "checkpoint")
              and (i == 0 or heads[i - 1] != h)]
    assert phases == ["engine", "data", "run", "step", "checkpoint"], first.stdout[:2000]
    assert first.stdout.startswith("engine: building")  # nothing before the first phase
    assert re.findall(r"^step +(\d+)/60", first.stdout, re.M) == [str(s) for s in range(10, 61, 10)]
    run = home / "runs" / "tiny"
    steps = _metrics(run)
    assert [m["step"] for m in steps] == list(range(1, 61))
    first_loss, last_loss = steps[0]["train/loss"], sum(m["train/loss"] for m in steps[-5:]) / 5
    assert last_loss < first_loss - 1.0, (first_loss, last_loss)  # it learned
    manifest = json.loads((home / "data" / "stdlib" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 512 and manifest["splits"]["train"]["tokens"] > 10**6
    assert (run / "checkpoints" / "step00000060").is_dir()
    evals = [(m["step"], m["eval/loss"]) for m in steps if "eval/loss" in m]
    assert [s for s, _ in evals] == [20, 40, 60] and evals[-1][1] < evals[0][1]  # eval_every 20
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 60
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    # "Running it again finds the run complete and does nothing"
    assert again.returncode == 0, again.stderr[-3000:]
    assert "complete at step 60: nothing to do" in again.stdout + again.stderr
    assert len(_metrics(run)) == 60 and after_again == after_first  # changed nothing


# ---- the commands that read the run, in-process --------------------------------------------
def run_cli(argv: list[str], home: Path, capsys, monkeypatch) -> str:
    monkeypatch.chdir(home)
    capsys.readouterr()
    code = main(argv + SMALL.get(argv[0], []))
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return out.out


def check_report(out: str, home: Path):
    """report.png, and a one-line summary whose final loss is the run's last."""
    last = _metrics(home / "runs" / "tiny")[-1]
    assert out.splitlines()[0].startswith(f"steps {last['step']} ")
    assert f"final loss {last['train/loss']:.4f}" in out
    assert (home / "runs" / "tiny" / "report.png").stat().st_size > 10_000


def check_eval(out: str, home: Path):
    """Loss and bits per byte on the run's own validation set, one JSON line: over the
    windows the trainer's last evaluation scored, its eval/loss and eval/bpb at step 60."""
    (line,) = out.splitlines()
    res = json.loads(line)
    assert res["split"] == "val" and res["step"] == 60
    cfg = yaml.safe_load((home / "runs" / "tiny" / "config.yaml").read_text())
    block = cfg["model"]["block_size"]
    manifest = json.loads((home / cfg["data"]["out_dir"] / "manifest.json").read_text())
    in_split = (manifest["splits"]["val"]["tokens"] - 1) // block
    set_size = cfg["data"]["eval_batches"] * cfg["train"]["micro_batch_size"]  # eval_sequences 0
    assert res["windows"] == min(set_size, in_split) and res["tokens"] == res["windows"] * block
    last = _metrics(home / "runs" / "tiny")[-1]
    assert math.isclose(res["loss"], last["eval/loss"], rel_tol=1e-5), (res, last)
    assert math.isclose(res["bits_per_byte"], last["eval/bpb"], rel_tol=1e-5)


def check_sample(out: str, home: Path):
    """Text continued from the prompt by the trained model."""
    assert out.startswith("def ") and len(out.strip()) > len("def")


def check_export(out: str, home: Path):
    """A Hugging Face model directory: its config, weights and tokenizer (that transformers
    loads it with no code of ours: tests/after/test_export_hf.py)."""
    hf = home / "hf" / "tiny"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (hf / name).is_file(), sorted(p.name for p in hf.iterdir())
    assert json.loads((hf / "config.json").read_text())["vocab_size"] >= 512


def check_config(out: str, home: Path):
    """Every key of the tiny preset, with its value: it reads back as the same config."""
    data = yaml.safe_load(out)
    tiny = load_config("tiny")
    for section in fields(tiny):
        assert set(data[section.name]) == {f.name for f in fields(getattr(tiny, section.name))}
    (home / "printed.yaml").write_text(out)
    assert load_config(str(home / "printed.yaml")) == tiny


def check_ds_config(out: str, home: Path):
    """gpt2-small's DeepSpeed JSON on 16 GPUs: 512 = micro 16 x accumulation 2 x 16 ranks."""
    ds = json.loads(out)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 512 == 16 * 2 * 16


# command -> (a phrase its README comment must hold, the check of that claim)
CHECKS = {
    "make train": ("trains the tiny model on the built-in corpus", check_make_train),
    f"{HARNESS} report runs/tiny": ("report.png and a one-line summary", check_report),
    f"{HARNESS} eval runs/tiny --split val --trainer-set": ("the run's validation set",
                                                             check_eval),
    f'{HARNESS} sample runs/tiny --prompt "def "': ("continued by the trained model",
                                                    check_sample),
    f"{HARNESS} export runs/tiny --to hf hf/tiny": ("Hugging Face model directory",
                                                   check_export),
    f"{HARNESS} config --config tiny": ("every key of the tiny preset", check_config),
    f"{HARNESS} ds-config --config gpt2-small --world-size 16": ("on 16 GPUs",
                                                                 check_ds_config),
}


def test_every_readme_command_is_known():
    """A command added to the README fails here until it has a check (or a reason it cannot
    run); one removed from it leaves no stale entry behind."""
    found = {command for command, _ in COMMANDS}
    unknown = sorted(found - set(CHECKS) - set(NOT_RUN))
    assert not unknown, f"README.md commands with no check in {__file__}: {unknown}"
    stale = sorted((set(CHECKS) | set(NOT_RUN)) - found)
    assert not stale, f"entries for commands no longer in README.md: {stale}"
    assert len(COMMANDS) >= 5  # the blocks were found at all


@pytest.mark.slow  # the tiny preset's 60 steps in a `harness train` process, twice
@pytest.mark.parametrize("command", sorted(CHECKS))
def test_readme_command(command, made, capsys, monkeypatch):
    claims = [comment for c, comment in COMMANDS if c == command]
    if not claims:
        pytest.skip("not in README.md (test_every_readme_command_is_known says so)")
    phrase, check = CHECKS[command]
    assert any(phrase in c for c in claims), (
        f"README.md's comment beside `{command}` no longer says '{phrase}': {claims}; "
        f"make its check in {__file__} match the new claim")
    if command == "make train":
        check(made, capsys)
        return
    home = made[0]
    argv = shlex.split(command)
    assert argv[0] == HARNESS
    check(run_cli(argv[1:], home, capsys, monkeypatch), home)

"""`harness export --to hf` against the real client: transformers loads the directory with no
code of ours and computes what the harness computes (issue 15).

For GPT-2 (Conv1D, transposed weights), Llama with grouped-query attention and a tied head,
and Llama with an untied head: logits within 1e-5 in fp32, the tokenizer's ids identical on
hard strings and on a corpus slice, transformers' greedy generate() equal to `harness sample
--temperature 0`; and the way back, model.init_from, gives bit-identical parameters.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from trained_runs import BASE, VARIANTS, train_run

from harness.checkpoint import io as checkpoint_io
from harness.cli import main
from harness.common.errors import HarnessError
from harness.config import load_config
from harness.data.corpus import stdlib_dir

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HARD = ["", " ", "  ", "\t", "\n", "\n\n\n", "a\tb\n\nc", " " * 37 + "x", "x" + " " * 64,
        "héllo wörld", "中文字符", "🙂🙃 emoji", "Ω≈ç√∫˜µ≤≥÷", "\u2581", "a\u2581 b\u2581\u2581",
        "</s>", "<unk>", "<0x41>", "\r\n", "\x00\x01\x7f", "def f(x):\n\treturn  x  # é 中文 🙂\r\n",
        "ǅ\u0301\u200d\ufeff", "    if x:\n        return {'a': [1, 2]}\n"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards_dir):
    """Each variant trained once, and exported once."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, overrides in VARIANTS.items():
        run = train_run(root / name, shards_dir, *overrides)
        hf = root / f"{name}-hf"
        assert main(["export", str(run), "--to", "hf", str(hf)]) == 0
        out[name] = (run, hf)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_logits_equal_ours(runs, variant):
    run, hf = runs[variant]
    ours = checkpoint_io.load(run).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    expected = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                "llama_untied": "LlamaForCausalLM"}[variant]
    assert type(theirs).__name__ == expected
    ids = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).float(), theirs(ids).logits.float()
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-5
    assert a.std() > 0.1  # a trained head, not all-equal logits


@pytest.mark.parametrize("variant", ["gpt2"])
def test_tokenizer_ids_identical(runs, variant):
    run, hf = runs[variant]
    loaded_cfg = checkpoint_io.load_config_of(run)
    ours = checkpoint_io.load_tokenizer(loaded_cfg, run)
    theirs = transformers.AutoTokenizer.from_pretrained(hf)
    for text in HARD:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), repr(text)
        assert theirs.decode(ids) == text, repr(text)
    assert theirs.eos_token_id == ours.eos_id and theirs.bos_token_id is None
    # a corpus slice the tokenizer was not trained on exactly: every id equal
    files = sorted(stdlib_dir().glob("*.py"))[:40]
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), f


def test_tokenizers_library_alone_gives_the_same_ids(runs):
    """tokenizer.json read by `tokenizers` directly (no transformers, no split_special_tokens):
    a literal "</s>" or "<unk>" in text is text, as in sentencepiece (issue 24: it became the
    special id). The one documented difference: decoding the EOS id writes "</s>", where
    sentencepiece writes nothing."""
    from tokenizers import Tokenizer

    run, hf = runs["gpt2"]
    ours = checkpoint_io.load_tokenizer(checkpoint_io.load_config_of(run), run)
    theirs = Tokenizer.from_file(str(hf / "tokenizer.json"))
    code = 'if tag == "</s>" or tok == "<unk>":\n    return "<s></s>" + x</s>y<unk>\n'
    for text in [*HARD, code, "</s>" * 5, "<unk></s><s>"]:
        ids = theirs.encode(text).ids
        assert ids == ours.encode(text), repr(text)
        assert theirs.decode(ids) == ours.decode(ids) == text, repr(text)
    assert ours.eos_id not in theirs.encode(code).ids
    x = ours.encode("ab")
    assert ours.decode([*x, ours.eos_id]) == "ab"
    assert theirs.decode([*x, ours.eos_id]) == "ab</s>"  # as docs/after-training.md says


def test_export_files_are_readable_as_the_umask_allows(runs):
    """Every file 0666 & ~umask (0644 under 022), as `cp` or `open` would make them:
    safetensors writes 0600, which the rest of a shared cluster cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    _, hf = runs["gpt2"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in hf.iterdir()}
    assert "model.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert hf.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generate_equals_harness_sample(runs, variant, capsys):
    run, hf = runs[variant]
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    prompt = "def main(argv):\n    "
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert main(["sample", str(run), "--prompt", prompt, "--max-new-tokens", "24",
                 "--temperature", "0", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["ids"] == new
    assert len(new) == 24 or new[-1] == tok.eos_token_id


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_init_from_round_trip_is_bit_identical(runs, variant, tmp_path, shards_dir):
    from harness.train.engine import build

    run, hf = runs[variant]
    want = checkpoint_io.load(run).model.state_dict()
    cfg = load_config("tiny", [*BASE, *VARIANTS[variant], f"train.run_dir={tmp_path / 'new'}",
                               f"data.out_dir={shards_dir}", f"model.init_from={hf}",
                               "train.seed=999"])
    got = build(cfg).engine.module.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_init_from_is_ignored_by_a_resumed_run(runs):
    from harness.model import build_model
    from harness.train.init_from import maybe_init

    run, _ = runs["gpt2"]
    cfg = checkpoint_io.load_config_of(run)
    cfg.model.init_from = "/nonexistent/hf-dir"  # a resume must not even look at it
    model = build_model(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maybe_init(model, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    cfg.train.run_dir = str(run.parent / "fresh")  # a new run does read it, and refuses
    with pytest.raises(HarnessError, match="no config.json"):
        maybe_init(model, cfg)


def test_model_card_and_files(runs):
    run, hf = runs["llama"]
    names = {p.name for p in hf.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model", "README.md", "generation_config.json"} <= names
    card = (hf / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "train/loss" in card and "n_kv_head: 2" in card
    config = json.loads((hf / "config.json").read_text())
    assert config["rope_theta"] == 5000.0 and config["num_key_value_heads"] == 2

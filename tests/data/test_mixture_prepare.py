"""data.mix from config to training start: bad values refused naming the key; a two-source mix
prepared into two directories with one tokenizer; the trainer's checks (open_shards, build_data's
max_repeats) and the resume rules for the sources and weights (mix_run.mix_phases)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from mix_corpus import mix_cfg, mix_override, one_process_built, prepared_root

import harness.train.mix_run as mix_run
import harness.train.run as run_mod
from harness.common.errors import HarnessError
from harness.config import load_config
from harness.data.mix_prepare import MixShards, prepare_mix
from harness.data.shards import TokenShards


@pytest.mark.parametrize("override, message", [
    ("data.mix=[{name: Web, sources: [a/]}]", r"data.mix\[0\].name='Web' must be 1-32 "),
    ("data.mix=[{name: w, sources: []}]", r"data.mix\[0\].sources is empty"),
    ("data.mix=[{name: w, sources: [a], weight: 0}]", r"data.mix\[0\].weight=0.0 must be"),
    ("data.mix=[{name: w, sources: [a], weight: -1}]", r"data.mix\[0\].weight=-1.0 must be"),
    ("data.mix=[{name: w, sources: [a], weight: abc}]", r"data.mix\[0\].weight must be a number"),
    ("data.mix=[{name: w, sources: [a], wieght: 1}]", r"unknown key 'data.mix\[0\].wieght': "
                                                      r"did you mean data.mix\[0\].weight\?"),
    ("data.mix=[{name: w, sources: [a]}, {name: w, sources: [b]}]",
     r"data.mix\[1\].name=w is the name of data.mix\[0\] too"),
    ("data.mix=[{name: w, sources: [a], max_repeats: -1}]", r"data.mix\[0\].max_repeats=-1 must"),
    ("data.mix=[{name: w, sources: [a], max_repeats: 1.5}]",
     r"data.mix\[0\].max_repeats must be a whole number"),
    ("data.mix=[{name: w, sources: a}]", r"data.mix\[0\].sources must be a list"),
    ("data.mix=[3]", r"data.mix\[0\] must be a mapping of name, sources, weight, max_repeats"),
    ("data.mix=[{name: a, sources: [a], weight: 1e-9}, {name: b, sources: [b]}]",
     r"data.mix\[0\].weight=1e-09 is a share of 1e-09 of the samples, below the 1/65536"),
    ("data.mix_reweight=maybe", r"data.mix_reweight must be true or false"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(HarnessError, match=message) as err:
        load_config("tiny", [override])
    assert "\n" not in str(err.value)


def test_mix_and_sources_together_are_refused():
    with pytest.raises(HarnessError, match=r"data.mix and data.sources are both set: .* set "
                                           r"data.sources=\[\]"):
        load_config("tiny", ["data.mix=[{name: w, sources: [a]}]", "data.sources=[b]"])


def test_weights_normalised_and_written_back_as_read(tmp_path):
    cfg = load_config("tiny", [mix_override(Path("w"), Path("c"), 7, 3, ", max_repeats: 2")])
    assert cfg.data.mix_shares() == [0.7, 0.3] and cfg.data.mix[1].max_repeats == 2
    from harness.config import to_yaml
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(str(tmp_path / "c.yaml")).data.mix == cfg.data.mix


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return prepared_root(tmp_path_factory, "mixprep")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_sources_prepared_with_one_tokenizer(root):
    out = root / "out"
    tok = _sha(out / "tokenizer.model")
    for name in ("web", "code"):
        shards = TokenShards.open(out / name, verify=True)
        assert _sha(shards.tokenizer_path) == tok == shards.manifest["tokenizer"]["sha256"]
        assert shards.manifest["sources_given"] == [str(root / name)]
        assert shards.manifest["splits"]["val"]["tokens"] > 0  # each its own validation split
    assert json.loads((out / "mix.json").read_text())["tokenizer_sha256"] == tok
    before = {n: TokenShards.open(out / n).fingerprint for n in ("web", "code")}
    # again, the mix listed in the other order and reweighted: nothing to prepare
    cfg = mix_cfg(root, w_web=0.1, w_code=0.9)
    cfg.data.mix.reverse()
    prepare_mix(cfg.data, progress=False)
    assert _sha(out / "tokenizer.model") == tok
    assert {n: TokenShards.open(out / n).fingerprint for n in ("web", "code")} == before


def test_a_source_changed_under_a_trained_tokenizer_is_refused(root, tmp_path):
    """The tokenizer was trained on the old content and the other source's shards tokenized
    with it: refused, naming data.tokenizer_model as the way to keep it."""
    shutil.copytree(root / "web", tmp_path / "web")
    shutil.copytree(root / "code", tmp_path / "code")
    shutil.copytree(root / "out", tmp_path / "out")
    with open(tmp_path / "code" / "00.py", "a") as f:
        f.write("\n# one more line\n")
    with pytest.raises(HarnessError, match=r"tokenizer.model was trained on other data.mix "
                                           r"sources .* data.tokenizer_model=.*tokenizer.model"):
        prepare_mix(mix_cfg(tmp_path).data, progress=False)


def test_a_single_corpus_out_dir_is_not_a_mix(shards_dir, root):
    cfg = mix_cfg(root, f"data.out_dir={shards_dir}")
    with pytest.raises(HarnessError, match=r"holds the shards of one corpus"):
        prepare_mix(cfg.data, progress=False)



def test_open_shards_prepares_on_one_process_and_refuses_on_several(root, tmp_path):
    for name in ("web", "code"):
        shutil.copytree(root / name, tmp_path / name)
    cfg = mix_cfg(tmp_path)
    with pytest.raises(HarnessError, match=r"holds no token shards, and 2 ranks cannot wait"):
        run_mod.open_shards(cfg, one_process_built(cfg, 2))
    shards = run_mod.open_shards(cfg, one_process_built(cfg))
    assert isinstance(shards, MixShards) and shards.names == ["web", "code"]
    assert (tmp_path / "out" / "web" / "manifest.json").is_file()
    assert run_mod.open_shards(cfg, one_process_built(cfg, 2)).fingerprint == shards.fingerprint


def test_max_repeats_refused_at_training_start(root):
    """code holds ~1400 sequences of 64 tokens at a 0.3 share of 16 per step: 300 steps draw
    1440 (~1.03 epochs): a cap of 1 refuses, naming data.mix[1].max_repeats; 250 steps pass."""
    over = mix_cfg(root, "model.block_size=64", "train.max_steps=300",
                   "optim.warmup_steps=10", extra=", max_repeats: 1")
    shards = MixShards(over.data)
    n_code = len(shards.parts[1].sequences("train", 64))
    assert 1300 < n_code < 1440
    with pytest.raises(HarnessError, match=r"^data.mix\[1\].max_repeats=1: this run draws 1,4\d\d "
                                           r"samples of 'code', 1.0\d epochs of its 1,[34]\d\d: "
                                           r"raise data.mix\[1\].max_repeats"):
        run_mod.build_data(over, one_process_built(over), shards)
    under = mix_cfg(root, "model.block_size=64", "train.max_steps=250",
                    "optim.warmup_steps=10", extra=", max_repeats: 1")
    data = run_mod.build_data(under, one_process_built(under), shards)
    assert data.source_names == ("web", "code")


def test_resume_rules_for_sources_and_weights(root, caplog):
    """mix_run.mix_phases against a checkpoint's meta: the same weights resume its phases; other
    weights are refused unless data.mix_reweight=true, which adds a phase at the resumed
    position; other sources or shards are refused."""
    cfg = mix_cfg(root)
    shards = MixShards(cfg.data)
    meta = {"step": 30, "consumed_samples": 480,
            "data_mix": mix_run.mix_meta(shards, [(0, [0.7, 0.3])])}
    meta = json.loads(json.dumps(meta))  # as read back from meta.json
    assert mix_run.mix_phases(cfg, shards, meta, Path("ck")) == [(0, [0.7, 0.3])]
    other = mix_cfg(root, w_web=0.5, w_code=0.5)
    with pytest.raises(HarnessError, match=r"^data.mix's weights \(shares web 0.5, code 0.5\) "
                                           r"differ from the ones checkpoint ck was trained with "
                                           r"\(web 0.7, code 0.3\): .*data.mix_reweight=true to "
                                           r"train with the new ones from step 30 on$"):
        mix_run.mix_phases(other, shards, meta, Path("ck"))
    other.data.mix_reweight = True
    with caplog.at_level("INFO", logger="harness"):
        assert mix_run.mix_phases(other, shards, meta, Path("ck")) == [(0, [0.7, 0.3]),
                                                                        (480, [0.5, 0.5])]
    assert ("data.mix_reweight: the weights change at step 30 (sample 480) from shares web "
            "0.7, code 0.3 to web 0.5, code 0.5") in caplog.text
    renamed = json.loads(json.dumps(meta))
    renamed["data_mix"]["fingerprints"] = {"code": "x", "web": "y"}
    with pytest.raises(HarnessError, match=r"data.mix names the sources \['web', 'code'\], "
                                           r"checkpoint ck was trained on \['code', 'web'\]"):
        mix_run.mix_phases(cfg, shards, renamed, Path("ck"))
    changed = json.loads(json.dumps(meta))
    changed["data_mix"]["fingerprints"]["code"] = "0" * 64
    with pytest.raises(HarnessError, match=r"data.mix source code: its shards .* differ"):
        mix_run.mix_phases(cfg, shards, changed, Path("ck"))
    with pytest.raises(HarnessError, match=r"trained without data.mix"):
        mix_run.mix_phases(cfg, shards, {"step": 3, "consumed_samples": 48}, Path("ck"))


def test_submit_makes_mix_paths_absolute_and_prepares_until_the_last_source(tmp_path,
                                                                            monkeypatch, capsys):
    """The job runs in the run directory: harness submit freezes data.mix[i].sources absolute,
    and its batch script prepares while the last source's manifest is missing (a mix is
    prepared in order)."""
    from harness.slurm import submit as submit_mod

    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", [mix_override(Path("w"), Path("~/c")), "data.out_dir=mixed",
                               "train.run_dir=run"])
    frozen = submit_mod.absolute_paths(cfg)
    assert [e.sources for e in frozen.data.mix] == [[str(tmp_path / "w")],
                                                    [str(Path("~/c").expanduser())]]
    assert submit_mod.submit_job(cfg, dry_run=True) == 0
    assert f"DATA_DIR={tmp_path}/mixed/code\n" in capsys.readouterr().out

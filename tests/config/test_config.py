"""Bad configs fail before any model is built: one line naming the key, exit code 2."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_utils import child_env

from harness.common.errors import HarnessError
from harness.config import load_config, preset_names
from harness.parallel.batch import checkpoint_segments, make_plan, plan_batch

AC = "activation_checkpointing"
BAD = [  # (overrides, the key the message must name)
    (["model.n_layre=4"], "model.n_layre"),
    (["model.n_layer=four"], "model.n_layer"),
    ([f"{AC}.partition_activation=true"], f"{AC}.partition_activation"),
    ([f"{AC}.policy=every_layer", f"{AC}.cpu_checkpointing=true"], f"{AC}.cpu_checkpointing"),
    ([f"{AC}.contiguous_memory_optimization=true"], f"{AC}.contiguous_memory_optimization"),
    ([f"{AC}.policy=count"], f"{AC}.number_checkpoints"),
    ([f"{AC}.policy=count", f"{AC}.number_checkpoints=9"], f"{AC}.number_checkpoints"),
    ([f"{AC}.policy=sometimes"], f"{AC}.policy"),
    (["train.global_batch_size=30"], "train.global_batch_size"),  # 30 != 8 x 2 x 1
    (["train.grad_accum_steps=null", "train.global_batch_size=20"], "train.global_batch_size"),
    (["train.global_batch_size=null", "train.grad_accum_steps=null"], "train.global_batch_size"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.precision=fp8"], "train.precision"),
    (["zero.stage=4"], "zero.stage"),
    (["zero.offload_optimizer=true"], "zero.offload_optimizer"),
    (["model.n_head=3"], "model.d_model"),
    (["optim.warmup_steps=1000"], "optim.warmup_steps"),
    (["optim.lr_scaling=true"], "optim.base_global_batch"),
    (["clip.max_norm=-1"], "clip.max_norm"),
    (["clip.value=0.5", "zero.stage=2"], "clip.value"),
    (["model.dropout=1.5"], "model.dropout"),
    ([f"{AC}.policy=every_k", f"{AC}.every_k=9"], f"{AC}.every_k"),
    # fp32 accumulation of bf16 gradients exists only in DeepSpeed's ZeRO optimizers
    (["train.precision=bf16", "train.grad_accum_dtype=fp32"], "train.grad_accum_dtype"),  # ZeRO 0
    (["train.precision=bf16", "zero.stage=1", "train.grad_accum_dtype=fp16"], "train.grad_accum_dtype"),
    (["train.precision=bf16", "zero.stage=1", "train.reduce_dtype=int8"], "train.reduce_dtype"),
    # DeepSpeed's ZeRO-0 fp16 optimizers ignore hysteresis; ZeRO 1 uses its DynamicLossScaler
    (["train.precision=fp16", "train.grad_accum_dtype=fp16"], "zero.stage=1"),
    (["train.precision=fp16", "zero.stage=1", "clip.value=1.0"], "clip.value"),
]


def test_bf16_at_stage0_is_accepted_when_summed_in_bf16():
    cfg = load_config("tiny", ["train.precision=bf16", "train.grad_accum_dtype=bf16"])
    assert (cfg.train.grad_accum_dtype, cfg.train.reduce_dtype) == ("bf16", "fp32")


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(HarnessError) as err:
        cfg = load_config("tiny", ["model.n_layer=4", *overrides])
        make_plan(cfg, 1)
    assert key in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args,needle", [
    (["train", "model.n_layre=4"], "model.n_layre"),
    (["ds-config", "train.global_batch_size=30"], "train.global_batch_size"),
    (["ds-config", "--config", "nope"], "nope"),
    (["ds-config", "--config", "missing.yaml"], "missing.yaml"),
    (["train", f"{AC}.cpu_checkpointing=true", f"{AC}.policy=every_layer"], "partition_activations"),
    # refused before any engine exists (CI has no GPU; a GPU machine skips these two)
    (["train", "train.device=cpu", "train.precision=fp16", "zero.stage=1"], "needs a GPU"),
    (["train", "train.device=cuda"], "train.device=cuda"),
])
def test_cli_exit_2_one_line_no_traceback(args, needle):
    if "train.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_preset_loads():
    assert {"tiny", "gpt2-small", "gpt2-medium", "gpt-1.3b"} <= set(preset_names())
    for name in preset_names():
        load_config(name)


@pytest.mark.parametrize("g,m,a,dp,want", [
    (None, 4, 8, 2, (64, 4, 8)), (64, None, 8, 2, (64, 4, 8)), (64, 4, None, 2, (64, 4, 8)),
    (64, 4, 8, 2, (64, 4, 8)), (512, 16, None, 8, (512, 16, 4)),
])
def test_any_two_determine_the_third(g, m, a, dp, want):
    b = plan_batch(g, m, a, dp)
    assert (b.global_batch, b.micro_batch, b.grad_accum) == want
    assert b.global_batch == b.micro_batch * b.grad_accum * b.dp_size


def test_linear_lr_scaling():
    cfg = load_config("tiny", ["optim.lr_scaling=true", "optim.base_global_batch=8", "optim.lr=1e-3",
                               "train.global_batch_size=null", "train.grad_accum_steps=2"])
    assert make_plan(cfg, 2).lr == pytest.approx(1e-3 * 32 / 8)  # global 8 x 2 x 2 = 32


@pytest.mark.parametrize("policy,extra,want", [
    ("none", [], ()),
    ("every_layer", [], ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8))),
    ("every_k", ["every_k=3"], ((2, 3), (5, 6))),
    ("sqrt", [], ((0, 3), (3, 5), (5, 8))),  # round(sqrt 8) = 3 segments
    ("count", ["number_checkpoints=2"], ((0, 4), (4, 8))),
])
def test_checkpoint_segments(policy, extra, want):
    cfg = load_config("tiny", ["model.n_layer=8", f"{AC}.policy={policy}",
                               *[f"{AC}.{e}" for e in extra]])
    assert checkpoint_segments(cfg.activation_checkpointing, 8) == want


# ---- every numeric key is range-checked by its own section ---------------------------------
def _numeric_keys():
    from dataclasses import fields

    from harness.config import Config
    from harness.config.input import _keys

    for section in fields(Config):
        for name, kind in _keys(section.default_factory).items():
            if kind in ("int", "float"):
                yield pytest.param(section.name, section.default_factory, name, kind,
                                   id=f"{section.name}.{name}")


@pytest.mark.parametrize("section,cls,name,kind", list(_numeric_keys()))
def test_every_numeric_key_is_range_checked_by_its_section(section, cls, name, kind):
    bad = ([float("nan"), float("inf"), float("-inf"), -1e300, True] if kind == "float"
           else [-1, 2**63, 1.5, True])
    for value in bad:
        obj = cls()
        setattr(obj, name, value)
        with pytest.raises(HarnessError, match=re.escape(f"{section}.{name}")) as err:
            obj.validate()
        assert "\n" not in str(err.value), (value, str(err.value))


def test_every_section_validates_its_own_keys():
    from dataclasses import fields

    from harness.config import Config

    for section in fields(Config):
        assert "validate" in vars(section.default_factory), section.name


@pytest.mark.parametrize("override,message", [
    ("optim.lr=inf", "optim.lr=inf must be a finite number in (0, 1]: e.g. optim.lr=3e-4"),
    ("optim.beta1=1.5", "optim.beta1=1.5 must be a finite number in [0, 1): e.g. 0.9"),
    ("fp16.initial_scale_power=40", "fp16.initial_scale_power=40 must be an integer in 0..32"),
    ("zero.reduce_bucket_size=0", "zero.reduce_bucket_size=0 must be an integer in 1.."),
    ("model.n_layre=4", "unknown key 'model.n_layre': did you mean model.n_layer? "
                        "(`harness config` prints every key)"),
    ("modle.n_layer=4", "unknown key 'modle': did you mean model?"),
    ("model=3", "model is a section, not the value 3: set its keys, e.g. model.n_layer=..."),
    ("train.max_steps=1e5", "train.max_steps=100000.0 must be a whole number: write 100000"),
    ("train.run_dir=${oc.env:HARNESS_UNSET_FOR_TEST}",
     "reads the environment variable HARNESS_UNSET_FOR_TEST, which is not set"),
])
def test_messages_name_the_key_and_the_fix(override, message):
    with pytest.raises(HarnessError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)


def test_a_value_yaml_cannot_parse_is_taken_as_a_string():
    cfg = load_config("tiny", ["wandb.name=`quoted`", "wandb.group=@team"])
    assert (cfg.wandb.name, cfg.wandb.group) == ("`quoted`", "@team")


def test_folded_yaml_is_refused_and_the_harness_never_writes_it(tmp_path):
    from harness.config import to_yaml

    folded = tmp_path / "folded.yaml"
    folded.write_text("train:\n  run_dir: runs/a\n    b\n")
    with pytest.raises(HarnessError, match="train.run_dir spans lines 2-3"):
        load_config(str(folded))
    # a value long enough for a YAML dumper to wrap stays on one line, and loads back
    cfg = load_config("tiny", ["wandb.name=" + "word " * 40 + "end",
                               "wandb.tags=[a b c, '1e3', 'true', 'x: y', '', '1:30:00']"])
    (tmp_path / "resolved.yaml").write_text(to_yaml(cfg))
    assert load_config(str(tmp_path / "resolved.yaml")) == cfg


@pytest.mark.parametrize("name", ["tiny", "gpt2-small", "gpt-1.3b"])
def test_harness_config_prints_every_key_and_reads_back(name, tmp_path, capsys):
    from dataclasses import fields

    from harness.cli import main
    from harness.config import Config
    from harness.config.input import _keys

    assert main(["config", "--config", name]) == 0
    text = capsys.readouterr().out
    for section in fields(Config):
        for key in _keys(section.default_factory):
            assert f"\n  {key}:" in text, f"{section.name}.{key}"
    (tmp_path / "shown.yaml").write_text(text)
    assert load_config(str(tmp_path / "shown.yaml")) == load_config(name)
    assert main(["ds-config", "--config", name, "--show-config"]) == 0
    assert capsys.readouterr().out == text


# ---- the top-level handler -------------------------------------------------------------------
def _boom(args):
    raise ValueError("something the harness did not expect")


def test_unexpected_error_is_one_line_and_the_traceback_is_kept(monkeypatch, capsys):
    from harness import cli

    monkeypatch.setitem(cli.COMMANDS, "config", _boom)
    monkeypatch.delenv("HARNESS_DEBUG", raising=False)
    assert cli.main(["config"]) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: unexpected ValueError: something the harness did not "
                               "expect (full traceback in ")
    path = Path(re.search(r"full traceback in (\S+);", lines[0])[1])
    saved = path.read_text()
    assert "Traceback" in saved and "_boom" in saved
    path.unlink()
    monkeypatch.setenv("HARNESS_DEBUG", "1")
    assert cli.main(["config"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "_boom" in err
    Path(re.search(r"full traceback in (\S+);", err)[1]).unlink()


def test_unexpected_error_in_train_is_written_under_the_run_dir(monkeypatch, capsys, tmp_path):
    from harness import cli

    def train(args):
        cli._load(args)
        Path(args.overrides[0].split("=", 1)[1]).mkdir()
        raise RuntimeError("late")

    monkeypatch.setitem(cli.COMMANDS, "train", train)
    run_dir = tmp_path / "run"
    assert cli.main(["train", f"train.run_dir={run_dir}"]) == 1
    line = capsys.readouterr().err.strip()
    (saved,) = run_dir.glob("traceback-*.txt")
    assert f"full traceback in {saved.resolve()}" in line and "RuntimeError: late" in line
    assert "RuntimeError: late" in saved.read_text()


def test_ctrl_c_before_training_is_one_line_and_exit_130(monkeypatch, capsys):
    from harness import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "config", interrupted)
    assert cli.main(["config"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


def test_bad_flags_are_one_error_line_not_argparse_usage(capsys):
    from harness.cli import main

    assert main(["ds-config", "--world-size", "two"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: harness ds-config: argument "
                                                   "--world-size: invalid int value: 'two'")


def test_ctrl_c_exit_code_is_the_same_before_and_during_training():
    from harness import cli
    from harness.train import preemption

    assert cli.INTERRUPT_EXIT_CODE == preemption.INTERRUPT_EXIT_CODE == 130

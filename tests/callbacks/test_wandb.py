"""W&B (offline), throughput/memory/clip-rate metrics and the report, on the real tiny trainer.

One 6-step run (module fixture) feeds most tests: WandbLogger + Throughput + MetricsFile, with
WANDB_MODE=offline overriding the config's "disabled", a secret WANDB_API_KEY in the
environment and one synthetic monitor event at step 3. The .wandb file is read back with
tests/wandb_reader.py and compared with metrics.jsonl.
"""
import json
import secrets
from types import SimpleNamespace

import matplotlib.image
import pytest
from engine_utils import make_data
from omegaconf import OmegaConf
from wandb_reader import chunks, read_run, run_files

from harness.callbacks.loggers import MetricsFile
from harness.callbacks.memory import PeakMemory
from harness.callbacks.throughput import Throughput
from harness.callbacks.wandb_logger import WandbLogger
from harness.common.callback import Callback
from harness.common.errors import HarnessError
from harness.config import ModelConfig, load_config
from harness.config.wandb import WandbConfig
from harness.model.flops import flops_per_token, mfu, peak_flops
from harness.train.engine import build
from harness.train.report import main, summary, write_report
from harness.train.run_dir import write_run_files
from harness.train.trainer import Trainer

STEPS = 6
EVENT = {"event": "grad_spike", "signal": "optim/grad_norm_preclip", "value": 3.5, "z": 7.25,
         "action": None}


class EmitAt(Callback):
    """Stands in for the monitor: one event, broadcast like the real one."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            trainer.emit({**EVENT, "step": step})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("wandb_run")
    key = secrets.token_hex(20)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_API_KEY", key)
        mp.delenv("WANDB_RUN_ID", raising=False)
        cfg = load_config("tiny", [f"train.max_steps={STEPS}", "model.n_layer=2",
                                   "model.d_model=64", "optim.warmup_steps=2",
                                   f"train.run_dir={run_dir}"])
        built = build(cfg)
        write_run_files(run_dir, cfg, built)
        logger = WandbLogger(WandbConfig())  # mode "disabled": WANDB_MODE must win
        callbacks = [MetricsFile(run_dir), Throughput(window=3), PeakMemory(), logger, EmitAt(3)]
        # synthetic tokens: the corpus pipeline is not what these tests are about
        trainer = Trainer(cfg, built, make_data(cfg, built.plan.batch.micro_batch), callbacks)
        trainer.fit()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(dir=run_dir, key=key, trainer=trainer, logger=logger,
                           steps=[x for x in lines if "event" not in x],
                           events=[x for x in lines if "event" in x])


def as_logged(metrics):
    """What WandbLogger should have sent for one metrics.jsonl line."""
    return {("train/step" if k == "step" else k): int(v) if isinstance(v, bool) else v
            for k, v in metrics.items()}


# ---- (1) every step once, namespaced keys, values as in metrics.jsonl, the DeepSpeed JSON ----
def test_offline_history_matches_metrics_file(run):
    files = run_files(run.dir / "wandb")
    assert len(files) == 1
    wb = read_run(files[0])
    assert wb.complete and wb.run_id == run.logger.run_id
    rows = wb.rows("train/loss")
    assert [r["train/step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows == [as_logged(m) for m in run.steps]
    assert all("/" in k for r in rows for k in r)
    assert {"throughput/tokens_per_s", "optim/clip_rate", "memory/cpu_rss_gb"} <= set(rows[0])
    assert wb.config["deepspeed"] == json.loads((run.dir / "ds_config.json").read_text())
    assert wb.config["harness"]["train"]["max_steps"] == STEPS


def test_event_becomes_metrics_and_alert(run):
    wb = read_run(run_files(run.dir / "wandb")[0])
    assert wb.rows("monitor/grad_spike") == [{"train/step": 3, "monitor/grad_spike": 1,
                                              "monitor/grad_spike/value": 3.5,
                                              "monitor/grad_spike/z": 7.25}]
    (title, text), = wb.alerts
    assert title == "harness: grad_spike" and "step 3" in text and "7.25" in text


# ---- (2) a resumed job continues the same run id; the union of steps has no duplicates -----
def test_resume_continues_same_run(run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    state = run.logger.state_dict()
    assert state == {"run_id": run.logger.run_id} and state["run_id"]
    assert json.loads(json.dumps(state)) == state  # checkpoints keep it in meta.json
    resumed = WandbLogger(WandbConfig(dir=str(tmp_path)))
    resumed.load_state_dict(state)
    trainer = SimpleNamespace(is_main=True, cfg=run.trainer.cfg, built=run.trainer.built,
                              stop_reason=None)
    resumed.on_train_start(trainer)
    for step in range(STEPS + 1, STEPS + 4):
        resumed.on_step_end(trainer, step, {**run.steps[-1], "step": step})
    resumed.on_train_end(trainer)
    files = run_files(run.dir / "wandb", state["run_id"]) + run_files(tmp_path, state["run_id"])
    assert len(files) == 2
    runs = [read_run(f) for f in files]
    assert {r.run_id for r in runs} == {state["run_id"]} and all(r.complete for r in runs)
    steps = [row["train/step"] for r in runs for row in r.rows("train/loss")]
    assert steps == list(range(1, STEPS + 4))


def test_reader_joins_records_across_blocks(run, tmp_path, monkeypatch):
    # a config bigger than a 32 KiB block is written as FIRST, MIDDLE..., LAST chunks
    monkeypatch.setenv("WANDB_MODE", "offline")
    blob = secrets.token_hex(50_000)
    trainer = SimpleNamespace(is_main=True, cfg=run.trainer.cfg, stop_reason=None,
                              built=SimpleNamespace(ds_config={"blob": blob}))
    logger = WandbLogger(WandbConfig(dir=str(tmp_path)))
    logger.on_train_start(trainer)
    logger.on_train_end(trainer)
    path, = run_files(tmp_path)
    assert read_run(path).config["deepspeed"] == {"blob": blob}  # waits for the whole file
    data = bytearray(path.read_bytes())
    assert {2, 3, 4} <= {kind for kind, _ in chunks(bytes(data))}
    data[data.index(blob[:64].encode())] ^= 1  # one flipped bit: the checksum must notice
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_run(path)


def test_disabled_mode_starts_nothing(run, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(WandbConfig(mode="disabled"))
    logger.on_train_start(run.trainer)
    assert logger.run is None and logger.state_dict() == {"run_id": None}


def test_config_is_structured_and_validated(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(WandbConfig),
                                              {"mode": "offline", "tags": ["a"]}))
    assert cfg.tags == ["a"] and cfg.resolved_mode() == "offline"
    with pytest.raises(HarnessError, match=r"wandb\.mode"):
        WandbConfig(mode="onlin").validate()
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(HarnessError, match="WANDB_MODE"):
        WandbConfig().validate()


# ---- (2b) online without a server: the same run, offline, after a bounded wait ---------------
def _online_fails(monkeypatch, error):
    """wandb.init as on a compute node without a route out: online raises `error` (after the
    timeout it was given, recorded), offline works as usual."""
    import wandb

    real, seen = wandb.init, []

    def init(*args, mode=None, settings=None, **kwargs):
        seen.append((mode, getattr(settings, "init_timeout", None)))
        if mode == "online":
            raise error
        return real(*args, mode=mode, settings=settings, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    return seen


def test_online_without_server_falls_back_to_offline(run, tmp_path, monkeypatch, caplog):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    seen = _online_fails(monkeypatch, wandb.errors.CommError("dial tcp: no route to host"))
    logger = WandbLogger(WandbConfig(mode="online", dir=str(tmp_path), init_timeout_s=7))
    trainer = SimpleNamespace(is_main=True, cfg=run.trainer.cfg, built=run.trainer.built,
                              stop_reason=None)
    with caplog.at_level("WARNING", logger="harness"):
        logger.on_train_start(trainer)
    assert seen == [("online", 7.0), ("offline", None)]
    warning, = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    offline, = run_files(tmp_path, logger.run_id)
    assert "no route to host" in warning and f"wandb sync {offline.parent}" in warning
    logger.on_step_end(trainer, 1, {**run.steps[0]})
    logger.on_train_end(trainer)
    assert [r["train/step"] for r in read_run(offline).rows("train/loss")] == [1]


def test_refused_login_is_an_error_not_a_fallback(run, tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    _online_fails(monkeypatch, wandb.errors.AuthenticationError("invalid API key"))
    logger = WandbLogger(WandbConfig(mode="online", dir=str(tmp_path)))
    trainer = SimpleNamespace(is_main=True, cfg=run.trainer.cfg, built=run.trainer.built)
    with pytest.raises(HarnessError, match=r"wandb.init failed \(invalid API key\): check "
                                           r"`wandb login`"):
        logger.on_train_start(trainer)


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), 10_000])
def test_init_timeout_is_bounded(value):
    with pytest.raises(HarnessError, match=r"wandb.init_timeout_s=.* must be a number of "
                                           r"seconds in \[1, 600\]"):
        WandbConfig(init_timeout_s=value).validate()


# ---- (3) the API key is never written ---------------------------------------------------------
def test_api_key_never_written(run):
    files = [p for p in run.dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    assert [p for p in files if run.key.encode() in p.read_bytes()] == []


# ---- (4) report.png and the summary -----------------------------------------------------------
def test_report_png_and_summary(run, capsys):
    path = write_report(run.dir)
    assert path == run.dir / "report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[:2] == (900, 1000)  # 3 panels
    s, rows = summary(run.dir), run.steps
    assert s["steps"] == STEPS and s["tokens"] == rows[-1]["train/tokens_seen"]
    assert s["final_loss"] == rows[-1]["train/loss"]
    assert s["clip_rate"] == sum(r["optim/clipped"] for r in rows) / STEPS
    assert s["events"] == len(run.events) == 1
    tps = [r["throughput/tokens_per_s"] for r in rows[1:]]  # step 1 is warm-up
    assert s["mean_tokens_per_s"] == pytest.approx(sum(tps) / len(tps))
    assert main(str(run.dir)) == 0
    assert f"steps {STEPS}" in capsys.readouterr().out


def test_report_keeps_the_rerun_after_a_rollback(tmp_path):
    def line(step, loss):
        return json.dumps({"step": step, "train/loss": loss, "optim/grad_norm_preclip": 1.0,
                           "optim/clipped": False, "train/tokens_seen": 10 * step,
                           "throughput/tokens_per_s": 100.0})
    rolled = [line(1, 5.0), line(2, 9.0), '{"step": 2, "event": "rollback"}', line(2, 4.0),
              line(3, 3.0), '{"step": 4, "train/lo']  # the last line torn by a crash
    (tmp_path / "metrics.jsonl").write_text("\n".join(rolled))
    s = summary(tmp_path)
    assert (s["steps"], s["tokens"], s["final_loss"], s["events"]) == (3, 30, 3.0, 1)
    assert write_report(tmp_path).is_file()  # no config.yaml: no threshold line, no failure


def test_report_without_metrics_names_the_file(tmp_path):
    with pytest.raises(HarnessError, match="metrics.jsonl"):
        summary(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(HarnessError, match="metrics.jsonl"):
        write_report(tmp_path)


# ---- (5) MFU against a hand-computed value ----------------------------------------------------
def test_mfu_gpt2_small_on_h100():
    # GPT-2 small: 12 layers, d 768, T 1024, vocab 50257, tied embeddings, biases:
    # N = 124,439,808 parameters, of which the position table 1024 x 768 = 786,432 is a lookup.
    # matmul FLOPs 6 x (124,439,808 - 786,432) = 6 x 123,653,376 = 741,920,256
    # attention    12 x L x d x T = 12 x 12 x 768 x 1024    =     113,246,208
    # per token                                             =     855,166,464
    gpt2 = ModelConfig(n_layer=12, n_head=12, d_model=768, block_size=1024, vocab_size=50257)
    f = flops_per_token(gpt2, 124_439_808)
    assert f == 855_166_464
    # 8 H100s together at 400,000 tokens/s: 855,166,464 x 4e5 = 3.420665856e14 FLOP/s in all,
    # over 8 x 989e12 = 7.912e15 FLOP/s of peak -> 0.0432339...
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert mfu(f, 400_000, 8, peak_flops("NVIDIA H100 80GB HBM3", "bf16")) == pytest.approx(
        0.04323389605, rel=1e-9)


# ---- (6) Throughput: CPU memory, no MFU on a CPU; MFU and GPU memory on a (faked) GPU ---------
def test_throughput_on_cpu(run):
    # PeakMemory reports the first step, every log_every (10) steps, and the last
    memory = {r["step"]: r["memory/cpu_rss_gb"] for r in run.steps if "memory/cpu_rss_gb" in r}
    assert set(memory) == {1, STEPS} and min(memory.values()) > 0.05
    assert memory[STEPS] >= memory[1]  # the process's peak so far: it cannot fall
    assert not any("throughput/mfu" in r or "memory/gpu_max_allocated_gb" in r for r in run.steps)
    clipped = [r["optim/clipped"] for r in run.steps]
    window = [clipped[max(0, i - 2):i + 1] for i in range(STEPS)]  # Throughput(window=3)
    assert [r["optim/clip_rate"] for r in run.steps] == [sum(w) / len(w) for w in window]


def test_clip_rate_is_a_sliding_window(run):
    cb = Throughput(window=2)
    cb.on_train_start(run.trainer)
    rates = []
    for step, clipped in enumerate([True, False, False, True], 1):
        metrics = {"throughput/tokens_per_s": 1.0, "optim/clipped": clipped}
        cb.on_step_end(run.trainer, step, metrics)
        rates.append(metrics["optim/clip_rate"])
    assert rates == [1.0, 0.5, 0.0, 0.5]
    restored = Throughput(window=2)
    restored.load_state_dict(cb.state_dict())  # a resume keeps the window
    assert list(restored.clipped) == [False, True]


@pytest.mark.parametrize("name, expect_mfu", [("NVIDIA H100 80GB HBM3", True),
                                              ("Mystery GPU 9000", False)])
def test_throughput_on_a_gpu(run, monkeypatch, caplog, name, expect_mfu):
    cuda = "harness.callbacks.throughput.torch.cuda"
    monkeypatch.setattr(f"{cuda}.get_device_name", lambda *a: name)
    built = SimpleNamespace(n_params=run.trainer.built.n_params, device="cuda",
                            dist=SimpleNamespace(world_size=4))
    trainer = SimpleNamespace(cfg=run.trainer.cfg, built=built, is_main=True, step=0)
    cb = Throughput()
    cb.on_train_start(trainer)
    metrics = {"throughput/tokens_per_s": 1e6, "optim/clipped": True}
    cb.on_step_end(trainer, 1, metrics)
    if expect_mfu:
        # the tiny preset trains in fp32: measured against the dense TF32 peak, not bf16's
        assert metrics["throughput/mfu"] == pytest.approx(cb.flops_per_token * 1e6 / (4 * 494.7e12))
    else:
        assert "throughput/mfu" not in metrics and name in caplog.text


def test_api_key_not_in_the_sbatch_script(tmp_path, monkeypatch):
    import harness.slurm.submit as submit_mod

    key = secrets.token_hex(20)
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setattr(submit_mod, "submit", lambda path: "12345")  # no cluster needed here
    cfg = load_config("tiny", [f"train.run_dir={tmp_path}", "wandb.mode=online"])
    assert submit_mod.submit_job(cfg) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"train.sbatch", "job_config.yaml"}
    assert not any(key in p.read_text(errors="replace") for p in written)

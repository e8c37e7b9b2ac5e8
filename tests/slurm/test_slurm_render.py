"""The rendered batch script: golden file, hostile values, and its requeue logic run by bash with
fake `srun` and `scontrol` (no Slurm needed)."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.common.errors import HarnessError
from harness.config.slurm import SlurmConfig
from harness.slurm.sbatch import render_sbatch, submit
from harness.train.preemption import REQUEUE_EXIT_CODE

GOLDEN = Path(__file__).parents[1] / "golden" / "train.sbatch"
FIXED = dict(run_dir="/runs/demo", train_args=["--config", "/runs/demo/config.yaml"],
             python="/usr/bin/python3", task_script="/opt/harness/launch/srun_task.sh",
             data_dir="/data/demo")

# records its argv, then exits with $FAKE_SRUN_EXIT or, when that is "wait", waits for USR1 or
# TERM and exits with the requeue code like the trainer
FAKE_SRUN = f"""#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/srun.argv"
trap 'echo USR1 >> "$FAKE_DIR/srun.signals"; exit {REQUEUE_EXIT_CODE}' USR1
trap 'echo TERM >> "$FAKE_DIR/srun.signals"; exit {REQUEUE_EXIT_CODE}' TERM
echo $$ > "$FAKE_DIR/tmp" && mv "$FAKE_DIR/tmp" "$FAKE_DIR/srun.pid"
[ "$FAKE_SRUN_EXIT" = wait ] || exit "$FAKE_SRUN_EXIT"
for _ in $(seq 100); do sleep 0.1 & wait $!; done
exit 99
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_DIR/scontrol.calls"
"""


def render(**cfg) -> str:
    return render_sbatch(SlurmConfig(**cfg), **FIXED)


def test_default_script_matches_golden():
    text = render()
    if os.environ.get("HARNESS_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "rerun with HARNESS_UPDATE_GOLDEN=1 if the change is meant"


def test_optional_directives():
    text = render(gpus_per_node=4, partition="gpu", account="proj1",
                  extra_sbatch=["--qos=high prio", "--exclusive"])
    for line in ["--ntasks-per-node=4", "--gres=gpu:4", "--partition=gpu", "--account=proj1",
                 '--qos="high prio"', "#SBATCH --exclusive"]:
        assert line in text
    assert "--gres" not in render(gpus_per_node=0)
    assert "#SBATCH --no-requeue" in render(requeue=False)


@pytest.mark.parametrize("cfg, key", [
    (dict(job_name="a\nb"), "slurm.job_name"),
    (dict(partition="p\r"), "slurm.partition"),
    (dict(nodes=0), "slurm.nodes"),
    (dict(time="tomorrow"), "slurm.time"),
    (dict(time="5400"), "slurm.time"),  # what YAML makes of an unquoted 1:30:00
    (dict(signal_grace_s=70000), "slurm.signal_grace_s"),
    (dict(extra_sbatch=["#SBATCH --qos=x"]), "slurm.extra_sbatch"),
    (dict(extra_sbatch=["--qos=x\n--wrap=evil"]), "slurm.extra_sbatch"),
    (dict(extra_sbatch=["--job-name=other"]), "slurm.job_name"),
])
def test_bad_values_name_the_key(cfg, key):
    with pytest.raises(HarnessError, match=key) as err:
        render(**cfg)
    assert "\n" not in str(err.value)


def run_body(script: str, tmp_path: Path, srun_exit: str, restarts: int = 0,
             send: tuple[tuple[str, int], ...] = ()) -> subprocess.CompletedProcess:
    """Run the script with bash as sbatch would, fake srun/scontrol first on PATH; once srun
    runs, `send` signals to "batch" (the script) or "srun"."""
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    for name, body in [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)]:
        (fake / "bin" / name).write_text(body)
        (fake / "bin" / name).chmod(0o755)
    (tmp_path / "job.sbatch").write_text(script)
    env = dict(os.environ, PATH=f"{fake / 'bin'}:{os.environ['PATH']}", FAKE_DIR=str(fake),
               FAKE_SRUN_EXIT=srun_exit, SLURM_JOB_ID="123", SLURM_RESTART_COUNT=str(restarts),
               HOME=str(tmp_path / "home"))
    proc = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while send and not (fake / "srun.pid").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "fake srun never started"
        time.sleep(0.05)
    for target, sig in send:
        os.kill(proc.pid if target == "batch" else int((fake / "srun.pid").read_text()), sig)
    out, err = proc.communicate(timeout=20)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def scontrol_calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "fake" / "scontrol.calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_hostile_values_stay_data(tmp_path):
    name = 'x"; rm -rf ~; echo "'
    run_dir = tmp_path / "run dir 'a' \"b\" $(touch pwned)"
    run_dir.mkdir()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "canary").touch()
    script = render_sbatch(
        SlurmConfig(job_name=name, partition=f"$(touch {tmp_path}/pwned)"), str(run_dir),
        ["--note", "$(touch pwned); `touch pwned`"], "/usr/bin/python3", "/opt/srun_task.sh")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    result = run_body(script, tmp_path, srun_exit="0")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "home" / "canary").exists()
    assert not list(tmp_path.rglob("pwned"))
    assert f"({name})" in result.stdout
    argv = (tmp_path / "fake" / "srun.argv").read_text().splitlines()
    assert argv[-2:] == ["--note", "$(touch pwned); `touch pwned`"]
    assert '#SBATCH --job-name="x\\"; rm -rf ~; echo \\""' in script


def _render_in(run_dir: Path) -> str:
    return render_sbatch(SlurmConfig(), str(run_dir), [], "/usr/bin/python3", "/opt/t.sh")


# stands in for python: records its argv; as prepare-data it writes the manifest, or fails with
# $FAKE_PREPARE_EXIT when that is set
FAKE_PYTHON = """#!/bin/bash
printf '%s\\n' "$@" >> "$FAKE_DIR/python.argv"
[ -n "${FAKE_PREPARE_EXIT:-}" ] && exit "$FAKE_PREPARE_EXIT"
mkdir -p "$FAKE_DATA" && echo {} > "$FAKE_DATA/manifest.json"
"""


@pytest.mark.parametrize("prepared, prepare_exit", [(False, ""), (True, ""), (False, "5")])
def test_missing_shards_are_prepared_before_the_step(tmp_path, monkeypatch, prepared,
                                                     prepare_exit):
    """No manifest in data.out_dir: the script runs `harness prepare-data` with the train
    command's own arguments, once, before srun; a failure ends the job with its exit code."""
    data = tmp_path / "data dir"
    if prepared:
        data.mkdir()
        (data / "manifest.json").write_text("{}")
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    monkeypatch.setenv("FAKE_DATA", str(data))
    monkeypatch.setenv("FAKE_PREPARE_EXIT", prepare_exit)
    script = render_sbatch(SlurmConfig(), str(tmp_path), ["--config", "/r/job config.yaml"],
                           str(python), "/opt/t.sh", data_dir=str(data))
    result = run_body(script, tmp_path, srun_exit="0")
    fake = tmp_path / "fake"
    called = fake / "python.argv"
    if prepared:
        assert result.returncode == 0 and not called.exists()
        return
    assert called.read_text().splitlines() == ["-m", "harness.cli", "prepare-data", "--config",
                                               "/r/job config.yaml"]
    if prepare_exit:
        assert result.returncode == 5 and "prepare-data failed with exit code 5" in result.stderr
        assert not (fake / "srun.argv").exists()  # no job step without shards
    else:
        assert result.returncode == 0, result.stderr
        assert (data / "manifest.json").is_file() and (fake / "srun.argv").exists()


def test_without_a_data_dir_nothing_is_prepared(tmp_path):
    script = _render_in(tmp_path)
    assert "DATA_DIR=''" in script
    result = run_body(script, tmp_path, srun_exit="0")
    assert result.returncode == 0 and "prepare-data" not in result.stdout + result.stderr


@pytest.mark.parametrize("srun_exit, restarts, requeued, code", [
    ("0", 0, False, 0),
    (str(REQUEUE_EXIT_CODE), 0, True, 0),
    (str(REQUEUE_EXIT_CODE), 20, False, REQUEUE_EXIT_CODE),  # max_restarts reached
    ("3", 0, False, 3),
])
def test_exit_code_decides_requeue(tmp_path, srun_exit, restarts, requeued, code):
    result = run_body(_render_in(tmp_path), tmp_path, srun_exit, restarts)
    assert result.returncode == code, result.stderr
    assert scontrol_calls(tmp_path) == (["requeue 123"] if requeued else [])


def test_usr1_is_forwarded_then_requeued(tmp_path):
    result = run_body(_render_in(tmp_path), tmp_path, "wait", send=(("batch", signal.SIGUSR1),))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fake" / "srun.signals").read_text() == "USR1\n"
    assert scontrol_calls(tmp_path) == ["requeue 123"]


def test_term_ends_the_job_without_requeue(tmp_path):
    # Slurm itself sends TERM to the tasks (here: fake srun) and to the script, which must not
    # pass it on (srun would kill its tasks at once) nor requeue a cancelled job
    send = (("batch", signal.SIGTERM), ("srun", signal.SIGTERM))
    result = run_body(_render_in(tmp_path), tmp_path, "wait", send=send)
    assert result.returncode == REQUEUE_EXIT_CODE, result.stderr
    assert (tmp_path / "fake" / "srun.signals").read_text() == "TERM\n"
    assert scontrol_calls(tmp_path) == []
    # what will happen, said by the script: Slurm, not the script, may requeue it
    assert "not requeued by this script (Slurm requeues the job itself" in result.stderr


def fake_sbatch(tmp_path: Path, monkeypatch, body: str) -> None:
    (tmp_path / "sbatch").write_text("#!/bin/bash\n" + body)
    (tmp_path / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_submit(tmp_path, monkeypatch):
    fake_sbatch(tmp_path, monkeypatch, 'echo "77;cluster1"')
    assert submit("job.sbatch") == "77"
    fake_sbatch(tmp_path, monkeypatch, "echo 'sbatch: error: Batch job submission failed:' >&2\n"
                "echo 'sbatch: error: Invalid partition name specified' >&2; exit 1")
    with pytest.raises(HarnessError, match="failed: sbatch: error: Invalid partition") as err:
        submit("job.sbatch")
    assert "\n" not in str(err.value)
    (tmp_path / "sbatch").unlink()
    with pytest.raises(HarnessError, match="sbatch not found"):
        submit("job.sbatch")

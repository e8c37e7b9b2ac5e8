"""One rank of a test run that may resume a checkpoint saved at another world size.

usage: reshard_worker.py OUT_DIR STOP_AT key=value ...   (STOP_AT 0: run to max_steps)
       reshard_worker.py --cases CASES.json OUT   (many runs in one launch: run_cases)
Like dist_worker.py (harness.train.run.make_trainer, then fit), and also writes on rank 0:
  OUT_DIR/start.pt  the full optimizer state right after resuming (absent on a fresh start)
  OUT_DIR/end.pt    the full optimizer state when the run stops
  OUT_DIR/savedN.pt the full optimizer state after the periodic save at step N
each {"params": full fp32 master weights, "exp_avg", "exp_avg_sq": per parameter,
"step": Adam's step per group, "groups": per-group hyperparameters, "step_count": trainer.step},
and OUT_DIR/rankR.pt: this rank's module parameters (gathered at ZeRO 3).
"""
import sys
from pathlib import Path

import torch
from engine_utils import StopAt, full_params

import harness.train.run as hr
from harness.common.callback import Callback
from harness.common.errors import HarnessError
from harness.config import load_config
from harness.parallel.distributed import close_process_group


class DumpSaved(Callback):
    """After each periodic save (the Checkpointer runs at order 90): OUT_DIR/savedN.pt."""
    order = 95

    def __init__(self, out):
        self.out = out

    def on_step_end(self, trainer, step, metrics):
        every = trainer.cfg.checkpoint.every
        if every and step % every == 0:
            state = full_state(trainer)
            if trainer.built.dist.rank == 0:
                torch.save(state, self.out / f"saved{step}.pt")


def full_state(trainer) -> dict:
    """Every rank must call (the gathers are collective); meaningful on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = trainer.engine
    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked"):
        # ZeRO 1/2 links the per-parameter views of Adam's state once, after the first step of
        # group 0, when torch's lazily created state of the later groups does not exist yet:
        # safe_get_full_optimizer_state then fails for them. Link again now that it exists.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    out = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}, "step_count": trainer.step}
    for name, p in engine.module.named_parameters():
        out["params"][name] = safe_get_full_fp32_param(p).detach().clone().cpu()
        for key in ("exp_avg", "exp_avg_sq"):
            out[key][name] = safe_get_full_optimizer_state(p, key).detach().clone().cpu()
    base = engine.optimizer.optimizer
    # ZeRO 1/2: one flat fp32 partition per group; ZeRO 3: per sub-group, and its
    # param_groups' "params" are empty between steps
    out["step"] = [float(s["step"]) for s in base.state.values() if "step" in s]
    out["groups"] = [{k: v for k, v in g.items() if k not in ("params",)}
                     for g in base.param_groups]
    return out


def run(out: Path, stop_at: int, overrides: list[str]) -> None:
    """One run; a HarnessError at the start (a refusal) ends the process with exit code 2."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        trainer, _ = hr.make_trainer(load_config("tiny", overrides))
    except HarnessError as exc:
        sys.stderr.write(f"error: {exc}\n")  # one write: ranks share the pipe
        close_process_group()
        sys.exit(2)
    rank = trainer.built.dist.rank
    if trainer.step > 0:
        state = full_state(trainer)
        if rank == 0:
            torch.save(state, out / "start.pt")
    if stop_at:
        trainer.callbacks.insert(0, StopAt(stop_at))
    trainer.callbacks.append(DumpSaved(out))
    trainer.fit()
    state = full_state(trainer)
    if rank == 0:
        torch.save(state, out / "end.pt")
    params = {n: p.detach().clone() for n, p in full_params(trainer.engine)}
    torch.save(params, out / f"rank{rank}.pt")


def run_cases(spec: Path, out: Path) -> None:
    """--cases CASES.json OUT_DIR: JSON {case id: {"stop_at", "overrides"}}, in order, in this
    one process, each into OUT_DIR/<case id>/ (tests/batched.py: a case that raises writes its
    traceback there and ends the ranks; a refusal ends them with exit code 2, recorded)."""
    from batched import case_dir, env_rank, read_cases

    for name, case in read_cases(spec).items():
        with case_dir(out, name, env_rank()) as d:
            run(d, int(case["stop_at"]), case["overrides"])


def main() -> None:
    if sys.argv[1] == "--cases":
        run_cases(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        run(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
    hr.leave_together()


if __name__ == "__main__":
    main()

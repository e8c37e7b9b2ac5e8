"""`harness report RUN_DIR`: one picture and a few numbers from RUN_DIR/metrics.jsonl.

report.png, against the optimizer step: the training loss with the validation loss
(eval/loss, at each evaluation: one axis, so the gap between them reads directly); the
pre-clip gradient norm (log scale) with the clip threshold clip.max_norm (from config.yaml) as
a horizontal line and the clipped steps marked; the learning rate (optim/lr, as scheduled,
monitor lr_cut included); monitor events as vertical lines; and the summary as text.

After a rollback metrics.jsonl holds some steps twice; the later line is the trajectory the
run kept, so it replaces the earlier one. Events are all kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from harness.common.errors import HarnessError
from harness.common.jsonl import as_number, read_lines

# what every step line of `harness train` holds, and the report reads
REQUIRED = ("train/loss", "optim/grad_norm_preclip", "optim/clipped", "train/tokens_seen",
            "throughput/tokens_per_s")


def _num(value: Any, what: str = "value") -> float:
    try:  # MetricsFile writes NaN/inf as the strings "nan", "inf"
        return float(as_number(value))
    except (TypeError, ValueError):
        raise HarnessError(f"{what} is {value!r}, not a number: not a metrics.jsonl line of "
                           "`harness train`") from None


def _int(value: Any, what: str) -> int:
    number = _num(value, what)
    if not number.is_integer():
        raise HarnessError(f"{what} is {value!r}, not an integer: not a metrics.jsonl line of "
                           "`harness train`")
    return int(number)


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step rows in step order, one per step, the last written winning; event lines)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise HarnessError(f"{path} not found: is {run_dir} a run directory (train.run_dir)?")
    by_step: dict[int, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    for obj in read_lines(path):
        if "event" in obj:
            if "step" in obj:
                obj = {**obj, "step": _int(obj["step"], f"{path}: an event's step")}
            events.append(obj)
        elif "step" in obj and "train/loss" in obj:
            step = _int(obj["step"], f"{path}: a step")
            missing = [k for k in REQUIRED if k not in obj]
            if missing:
                raise HarnessError(f"{path}: step {step} lacks {', '.join(missing)}: not a "
                                   "metrics.jsonl of `harness train` (or one of another version)")
            by_step[step] = obj
    if not by_step:
        raise HarnessError(f"{path} holds no training steps yet")
    return [by_step[s] for s in sorted(by_step)], [e for e in events if "step" in e]


def clip_threshold(run_dir: Path) -> Optional[float]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())[:120]
        raise HarnessError(f"{path} is not a readable YAML config ({reason}): restore the "
                           "config.yaml `harness train` wrote, or move it away") from None
    clip = config.get("clip") if isinstance(config, dict) else None
    max_norm = clip.get("max_norm") if isinstance(clip, dict) else None
    if max_norm is None:
        return None
    value = _num(max_norm, f"{path}: clip.max_norm")
    return value if value else None  # 0 disables clipping: no line


def summary(run_dir: Path) -> dict[str, Any]:
    """steps (the last one), tokens seen, final loss, clip rate, event count, mean tokens/s,
    and the last eval loss with its step (None, None without evaluations).

    The mean leaves out the first logged step when there are others: it pays for warm-up
    (allocation, kernel selection, JIT compilation) and would drag short runs down.
    """
    return _summarize(*read_metrics(run_dir))


def _summarize(rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, Any]:
    timed = rows[1:] or rows
    last = rows[-1]
    evals = _evals(rows)
    return {
        "steps": int(last["step"]),
        "tokens": _int(last["train/tokens_seen"], f"step {last['step']}: train/tokens_seen"),
        "final_loss": _num(last["train/loss"], f"step {last['step']}: train/loss"),
        "clip_rate": sum(bool(r["optim/clipped"]) for r in rows) / len(rows),
        "events": len(events),
        "mean_tokens_per_s": sum(_num(r["throughput/tokens_per_s"],
                                      f"step {r['step']}: throughput/tokens_per_s")
                                 for r in timed) / len(timed),
        "eval_loss": evals[-1][1] if evals else None,
        "eval_step": evals[-1][0] if evals else None,
    }


def _evals(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, eval/loss) of the steps that were evaluated."""
    return [(int(r["step"]), _num(r["eval/loss"], f"step {r['step']}: eval/loss"))
            for r in rows if "eval/loss" in r]


def format_summary(s: dict[str, Any]) -> str:
    evals = ("" if s.get("eval_loss") is None
             else f"eval loss {s['eval_loss']:.4f} (step {s['eval_step']:,}) | ")
    return (f"steps {s['steps']:,} | tokens {s['tokens']:,} | final loss {s['final_loss']:.4f} | "
            f"{evals}clip rate {s['clip_rate']:.1%} | events {s['events']} | "
            f"{s['mean_tokens_per_s']:,.0f} tokens/s")


def _mark_events(axes, events: list[dict[str, Any]]) -> None:
    colors = ["tab:red", "tab:purple", "tab:green", "tab:brown", "tab:pink", "tab:olive"]
    kinds = sorted({str(e["event"]) for e in events})
    for e in events:
        color = colors[kinds.index(str(e["event"])) % len(colors)]
        for ax in axes:
            ax.axvline(int(e["step"]), color=color, alpha=0.5, lw=1)
    for i, kind in enumerate(kinds):  # one legend entry per kind, not per event
        axes[0].plot([], [], color=colors[i % len(colors)], lw=1, label=kind)


def _figure(run_dir: Path, rows, events, text: str):
    """The report's matplotlib Figure: loss + eval loss, gradient norm, LR (top to bottom)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    steps = [int(r["step"]) for r in rows]
    norms = [_num(r["optim/grad_norm_preclip"], f"step {r['step']}: optim/grad_norm_preclip")
             for r in rows]
    fig = Figure(figsize=(10, 9), layout="constrained")
    ax_loss, ax_norm, ax_lr = fig.subplots(3, 1, sharex=True)
    ax_loss.plot(steps, [_num(r["train/loss"], f"step {r['step']}: train/loss") for r in rows],
                 lw=1, label="train/loss")
    evals = _evals(rows)
    if evals:
        ax_loss.plot(*zip(*evals), marker="o", ms=3, lw=1, label="eval/loss")
    ax_norm.plot(steps, norms, lw=1, label="optim/grad_norm_preclip")
    ax_norm.set_yscale("log")
    max_norm = clip_threshold(run_dir)
    if max_norm is not None:
        ax_norm.axhline(max_norm, color="black", ls="--", lw=1, label=f"clip.max_norm {max_norm:g}")
    clipped = [(s, n) for s, n, r in zip(steps, norms, rows) if r["optim/clipped"]]
    if clipped:
        ax_norm.scatter(*zip(*clipped), color="tab:orange", marker="x", s=16, zorder=3,
                        label=f"clipped ({len(clipped)})")
    lrs = [(int(r["step"]), _num(r["optim/lr"], f"step {r['step']}: optim/lr"))
           for r in rows if "optim/lr" in r]
    if lrs:
        ax_lr.plot(*zip(*lrs), lw=1, label="optim/lr")
    _mark_events((ax_loss, ax_norm, ax_lr), events)
    ax_loss.set_ylabel("loss")
    ax_norm.set_ylabel("pre-clip grad norm")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    for ax in (ax_loss, ax_norm, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{Path(run_dir).resolve().name}\n{text}", fontsize=10)
    return fig


def _plot(run_dir: Path, rows, events, text: str) -> Path:
    fig = _figure(run_dir, rows, events, text)
    out = Path(run_dir) / "report.png"
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise HarnessError(f"cannot write {out} ({e.strerror or e})") from None
    return out


def _report(run_dir: Path) -> tuple[Path, str]:
    rows, events = read_metrics(run_dir)
    text = format_summary(_summarize(rows, events))
    return _plot(Path(run_dir), rows, events, text), text


def write_report(run_dir: Path) -> Path:
    """Writes RUN_DIR/report.png and returns its path."""
    return _report(run_dir)[0]


def main(run_dir: str) -> int:
    out, text = _report(Path(run_dir))
    print(text)
    print(f"wrote {out}")
    return 0

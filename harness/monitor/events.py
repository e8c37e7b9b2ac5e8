"""A monitor event in one sentence, for people (the console): the real signal, its value,
the threshold it crossed and the action taken. metrics.jsonl, W&B and `harness monitor replay`
keep the event dicts themselves (harness.monitor.detector lists their fields).

The line leads with the level (alarm, warning, advice) and the signal: `warning` is the kind of
every precursor warning, whatever its signal; `advice` is a condition that holds for the rest
of a run (said once, never repeated).
"""
from __future__ import annotations

import json
from typing import Any, Callable


def _n(x: Any) -> str:
    """A number at 4 significant digits (a whole one in full: a loss scale, a step count);
    anything else (e.g. "nan") as written."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return str(x)
    return f"{x:.0f}" if float(x).is_integer() and abs(x) < 1e9 else f"{x:.4g}"


def _level(e: dict[str, Any]) -> str:
    sig, value = e["signal"], _n(e["value"])
    if sig.endswith("loss_scale"):  # the halving rule: z and threshold count halvings
        return (f"{sig} {value} is {_n(e['z'])} halvings below its window's maximum "
                f"{_n(e['baseline'])} (threshold {_n(e.get('threshold', '?'))} halvings)")
    text = (f"{sig} {value} is z {_n(e['z'])} over its baseline {_n(e['baseline'])} "
            f"(threshold z {_n(e.get('threshold', '?'))})")
    if "persist" in e:  # the loss's first step over: a warning, not yet a spike
        text += (f", its first step over (a warning; {e['persist']} steps over in a row, "
                 "after the LR warm-up, are a loss_spike alarm)")
    return text


def _warning(e: dict[str, Any]) -> str:
    rule = e.get("rule", "level")
    if rule == "trend":
        return (f"{e['signal']} {_n(e['value'])} rose x{_n(e['growth'])} over one window "
                f"(threshold x{_n(e.get('threshold', '?'))}), a steady ramp")
    if rule == "growth":
        return (f"{e['signal']} {_n(e['value'])} is x{_n(e['growth'])} its value "
                f"{_n(e['reference'])} of {e['span']} steps before (threshold "
                f"x{_n(e.get('threshold', '?'))}): a fast growth")
    return _level(e)


def _advice(e: dict[str, Any]) -> str:
    if e.get("rule") == "qk_norm":
        return (f"{e['signal']} peaks at {_n(e['value'])} without model.qk_norm: at LRs >= "
                f"{_n(e['lr'])} "
                "attention logits may grow until softmax saturates (Wortsman et al. 2023); "
                "model.qk_norm=true keeps them bounded")
    return (f"{e['signal']} {_n(e['value'])} reached {_n(e['ceiling'])}: attention logits this "
            "large saturate softmax (said once; model.qk_norm=true keeps them bounded)")


def _loss_spike(e: dict[str, Any]) -> str:
    text = "loss spike: " + _level({k: v for k, v in e.items() if k != "persist"})
    text += f" since step {e['onset']}"
    if e.get("warned_at") is None:
        return text + ", no warning before it"
    return (text + f"; first warned at step {e['warned_at']} by "
            f"{', '.join(e.get('warned_by') or []) or '?'} ({e['lead_steps']} steps ahead)")


def _param_jump(e: dict[str, Any]) -> str:
    return (f"{e['signal']} {_n(e['value'])} is over {_n(e['threshold'])}: the weights "
            "changed between two steps outside the optimizer")


def _rollback(e: dict[str, Any]) -> str:
    return (f"rolled back from step {e['from_step']} to checkpoint {e['checkpoint']} "
            f"(step {e['to_step']}), resuming at sample {e['resume_sample']:,} "
            f"({e['skipped_samples']:,} samples skipped)")


SENTENCES: dict[str, Callable[[dict[str, Any]], str]] = {
    "warning": _warning,
    "advice": _advice,
    "loss_spike": _loss_spike,
    "nonfinite": lambda e: f"{e['signal']} is {e['value']} (not finite)",
    "param_jump": _param_jump,
    "loss_scale_min": lambda e: f"fp16 overflow at the minimum loss scale {_n(e['value'])}",
    "rollback": _rollback,
}


def describe(event: dict[str, Any]) -> str:
    """`[monitor LEVEL] step N: <what happened>; action: <action or none>` in one line; an
    event of a kind (or fields) this module does not know: its JSON after the kind."""
    kind = str(event.get("event", "event"))
    head = f"[monitor {event['level']}]" if "level" in event else "[monitor]"
    head += f" step {event.get('step', '?')}: "
    try:
        text = SENTENCES[kind](event)
    except (KeyError, TypeError, ValueError):  # a field missing: say it all, raw
        rest = {k: v for k, v in event.items() if k not in ("event", "level", "step")}
        text = f"{kind} {json.dumps(rest, default=str)}"
    if "action" in event:
        text += f"; action: {event['action'] or 'none'}"
    return head + text

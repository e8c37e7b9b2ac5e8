"""The one error type users see: a one-line message, exit code 2, no traceback; and the range
checks every config section's `validate()` uses to raise it."""
from __future__ import annotations

import math
from typing import Optional


class HarnessError(Exception):
    """Bad config, bad input file or bad usage. The CLI prints `error: <msg>` and exits 2.

    The message names the key or file and says how to fix it.
    """

    exit_code = 2


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        try:
            digits = len(str(abs(value)))
        except ValueError:  # str() refuses more than 4300 digits
            digits = math.floor(math.log10(abs(value))) + 1
        return f"{'-' if value < 0 else ''}<a {digits}-digit number>"  # stays one short line
    return str(value)


def check_number(key: str, value: object, low: Optional[float] = None,
                 high: Optional[float] = None, *, integer: bool = False,
                 low_open: bool = False, high_open: bool = False, none_ok: bool = False,
                 fix: str = "") -> None:
    """Raise HarnessError unless `value` is a finite number (an int when `integer`) within
    [low, high] (open ends with low_open / high_open); None passes when `none_ok`.

    The message is one line: `key=value must be <what>`, then `: <fix>` when given."""
    if value is None and none_ok:
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = is_int or isinstance(value, float)
    ok = is_int if integer else is_num
    if ok and not is_int and not math.isfinite(value):  # type: ignore[arg-type]
        ok = False
    if ok and low is not None:
        ok = value > low if low_open else value >= low  # type: ignore[operator]
    if ok and high is not None:
        ok = value < high if high_open else value <= high  # type: ignore[operator]
    if ok:
        return
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        if integer:
            lo, hi = int(low) + (1 if low_open else 0), int(high) - (1 if high_open else 0)
            what = f"{kind} in {lo}..{hi}"
        else:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            what = f"{kind} in {left}{low:g}, {high:g}{right}"
    elif low is not None:
        what = f"{kind} {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        what = f"{kind} {'<' if high_open else '<='} {high:g}"
    else:
        what = kind
    if none_ok:
        what += " or null"
    raise HarnessError(f"{key}={_show(value)} must be {what}" + (f": {fix}" if fix else ""))


def check_line(key: str, value: object, *, empty_ok: bool = False, fix: str = "") -> None:
    """A string that is one line of printable characters (no newline, tab or control code)."""
    if not isinstance(value, str):
        raise HarnessError(f"{key}={_show(value)} must be a string")
    if not value and not empty_ok:
        raise HarnessError(f"{key} is empty: {fix or 'set it'}")
    if not value.isprintable():
        raise HarnessError(f"{key}={value!r} must be one line of printable characters: remove "
                           f"the newlines, tabs and control characters")

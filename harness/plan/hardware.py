"""GPUs described in data: harness/plan/hardware.yaml (shipped; A100 40/80GB, H100 SXM/PCIe/NVL,
H200, each value with its source) or a user's YAML of the same form (`--hardware FILE`), every
value range-checked; a bad one is refused in one line naming the file, the GPU and the key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from harness.common.errors import HarnessError

SHIPPED = Path(__file__).with_name("hardware.yaml")
PRECISIONS = ("bf16", "fp16", "fp32")
# (low, high] per key: beyond these a value is a typo or a unit slip (TB/s written as GB/s)
RANGES = {"memory_gb": (0, 10_000), "hbm_tb_s": (0, 100), "intra_node_gb_s": (0, 100_000),
          "inter_node_gb_s": (0, 100_000), "attention_fraction": (0, 1)}
PEAK_RANGE = (0, 1e6)  # TFLOP/s: 1 EFLOP/s per GPU is a typo
KEYS = ("name", "memory_gb", "peak_tflops", "hbm_tb_s", "intra_node_gb_s", "inter_node_gb_s",
        "attention_fraction", "source")


@dataclass(frozen=True)
class Hardware:
    """One GPU model and the links around it, in SI units (FLOP/s, bytes/s one way)."""
    key: str
    name: str
    memory_bytes: float
    peak: dict  # precision -> dense FLOP/s
    hbm_bytes_s: float
    intra_bytes_s: float  # per GPU inside a node (NVLink / NVSwitch or PCIe)
    inter_bytes_s: float  # per GPU between nodes (its share of the node's NICs)
    attention_fraction: float  # of the 16-bit peak, FlashAttention's causal forward + backward
    source: str

    def peak_for(self, precision: str) -> float:
        return self.peak[precision]


def load(path: Optional[Path] = None) -> dict[str, Hardware]:
    """Every GPU in the file (default: the shipped one), checked; names lower-cased, as
    --gpu is matched."""
    path = Path(path) if path is not None else SHIPPED
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise HarnessError(f"--hardware {path}: cannot read it ({err.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        what = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HarnessError(f"--hardware {path}: not valid YAML ({what})") from None
    if not isinstance(raw, dict) or not raw:
        raise HarnessError(f"--hardware {path}: must be a mapping of GPU names to their "
                           f"numbers (see harness/plan/hardware.yaml)")
    return {str(k).lower(): _entry(path, str(k), v) for k, v in raw.items()}


def pick(name: Optional[str], path: Optional[Path] = None) -> Hardware:
    """--gpu NAME from the file; with --hardware and no --gpu, the file's only GPU."""
    gpus = load(path)
    if name is None:
        if len(gpus) == 1:
            return next(iter(gpus.values()))
        raise HarnessError(f"--hardware {path} describes {len(gpus)} GPUs: pick one with --gpu "
                           f"({', '.join(gpus)})")
    if name.lower() not in gpus:
        raise HarnessError(f"--gpu {name!r} is not known: one of {', '.join(gpus)}, or describe "
                           f"it in a file passed as --hardware FILE")
    return gpus[name.lower()]


def _entry(path: Path, key: str, raw: object) -> Hardware:
    where = f"--hardware {path}: {key}"
    if not isinstance(raw, dict):
        raise HarnessError(f"{where} must be a mapping with {', '.join(KEYS)}")
    unknown = sorted(set(map(str, raw)) - set(KEYS))
    missing = [k for k in KEYS if k not in raw]
    if unknown or missing:
        raise HarnessError(f"{where}: {'unknown keys ' + ', '.join(unknown) if unknown else ''}"
                           f"{'; ' if unknown and missing else ''}"
                           f"{'missing ' + ', '.join(missing) if missing else ''} "
                           f"(keys: {', '.join(KEYS)})")
    values = {k: _number(where, k, raw[k], *RANGES[k]) for k in RANGES}
    peaks = raw["peak_tflops"]
    if not isinstance(peaks, dict) or set(map(str, peaks)) != set(PRECISIONS):
        raise HarnessError(f"{where}.peak_tflops must map exactly bf16, fp16, fp32 to dense "
                           f"TFLOP/s, e.g. {{bf16: 989, fp16: 989, fp32: 494.7}}")
    peak = {p: _number(where, f"peak_tflops.{p}", peaks[p], *PEAK_RANGE) * 1e12
            for p in PRECISIONS}
    for k in ("name", "source"):
        if not isinstance(raw[k], str) or not raw[k].strip():
            raise HarnessError(f"{where}.{k} must be a non-empty string (the source: the "
                               f"data sheet the numbers come from)")
    return Hardware(key, raw["name"].strip(), values["memory_gb"] * 1e9, peak,
                    values["hbm_tb_s"] * 1e12, values["intra_node_gb_s"] * 1e9,
                    values["inter_node_gb_s"] * 1e9, values["attention_fraction"],
                    " ".join(raw["source"].split()))


def _number(where: str, key: str, value: object, low: float, high: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low < value <= high:
        raise HarnessError(f"{where}.{key}={value!r} must be a number in ({low:g}, {high:g}] "
                           f"(units: the key's suffix; see harness/plan/hardware.yaml)")
    return float(value)

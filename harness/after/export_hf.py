"""`harness export RUN_DIR_OR_CHECKPOINT --to hf OUT_DIR`: a directory that transformers'
AutoModelForCausalLM and AutoTokenizer load with no code of ours.

OUT_DIR gets config.json (GPT2LMHeadModel or LlamaForCausalLM, harness/model/hf_format.py),
model.safetensors (fp32), generation_config.json, the tokenizer (harness/after/hf_tokenizer.py:
tokenizer.json encoding every string to our ids, plus the original tokenizer.model) and a
README.md model card (training config, final metrics). It is written to a temporary sibling
and renamed into place, so OUT_DIR is either absent, empty as it was, or complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from harness.after import hf_tokenizer
from harness.checkpoint import io as checkpoint_io
from harness.common.errors import HarnessError
from harness.model import hf_format

log = logging.getLogger("harness")
TARGETS = ("hf",)


def check_out_dir(out_dir: Path, example: str = "mine") -> None:
    """OUT_DIR is new or an empty directory, under a directory (not a file)."""
    try:
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise HarnessError(f"{out_dir} is not an empty directory: export into a new or "
                               f"empty one (nothing is ever overwritten)")
        above = out_dir.parent
        while not above.exists() and above != above.parent:
            above = above.parent
    except OSError as err:  # a directory we may not list
        raise HarnessError(f"--to hf {out_dir}: cannot look there ({err.strerror or err}): "
                           f"export into a directory of yours") from None
    if not above.is_dir():
        raise HarnessError(f"--to hf {out_dir}: {above} is a file, not a directory: export into "
                           f"a new or empty directory, e.g. --to hf hf/{example}")


def _file_mode() -> int:
    """rw for whom the umask allows (0644 under 022). safetensors writes 0600, unreadable to
    the rest of a shared cluster."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _need_hf_packages() -> None:
    try:
        import safetensors  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as err:
        raise HarnessError(f"harness export --to hf needs the `hf` extra ({err.name} is not "
                           f"installed): pip install -e '.[hf]'") from None


def export(source: str | Path, out_dir: str | Path, to: str = "hf") -> dict[str, Any]:
    """Write the export; returns a summary (paths, seconds)."""
    if to not in TARGETS:
        raise HarnessError(f"--to {to}: the only export target is hf (Hugging Face)")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, Path(source).resolve().name)
    _need_hf_packages()
    t0 = time.perf_counter()
    run_dir, step_dir = checkpoint_io.find_checkpoint(source)
    cfg = checkpoint_io.load_config_of(run_dir)
    hf_format.check_expressible(cfg.model)
    spm_file = checkpoint_io.tokenizer_path(cfg, run_dir)
    state = checkpoint_io.state_dict(step_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write(tmp, state, cfg, spm_file, run_dir, step_dir)
        for path in tmp.iterdir():
            path.chmod(_file_mode())
        os.replace(tmp, out_dir)  # an empty OUT_DIR is replaced as a whole
    except OSError as err:  # a read-only place, a full disk: nothing is left behind
        where = err.filename or out_dir
        raise HarnessError(f"--to hf {out_dir}: cannot write {where} ({err.strerror or err}): "
                           f"export into a writable directory with room") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"export": str(out_dir), "checkpoint": str(step_dir), "format": "hf",
            "architecture": hf_format.hf_config(cfg.model)["architectures"][0],
            "seconds": round(time.perf_counter() - t0, 3)}


def _write(tmp: Path, state, cfg, spm_file: Path, run_dir: Path, step_dir: Path) -> None:
    from safetensors.torch import save_file

    m = cfg.model
    save_file(hf_format.to_hf(state, m), str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_format.hf_config(m), indent=2) + "\n")
    generation = {"eos_token_id": hf_format.EOS_ID, "pad_token_id": hf_format.EOS_ID,
                  "bos_token_id": None}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    hf_tokenizer.save(spm_file, tmp, m.block_size)
    (tmp / "README.md").write_text(model_card(cfg, run_dir, step_dir))


def model_card(cfg, run_dir: Path, step_dir: Path) -> str:
    from harness.config import to_yaml

    meta = json.loads((step_dir / checkpoint_io.META).read_text())
    step = int(meta.get("step", 0))
    metrics = checkpoint_io.final_metrics(run_dir, step)
    keys = ("step", "train/loss", "eval/loss", "eval/bpb", "train/tokens_seen")
    rows = "\n".join(f"| `{k}` | {metrics[k]} |" for k in keys if k in metrics)
    arch = hf_format.hf_config(cfg.model)["architectures"][0]
    return f"""# {run_dir.name}

A {cfg.model.arch} decoder ({arch}) pretrained with the `harness` DeepSpeed harness, exported
by `harness export {run_dir} --to hf` from checkpoint `{step_dir}` (step {step}).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("THIS_DIR")
tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")
```

The tokenizer is the run's sentencepiece BPE ({cfg.model.vocab_size}-entry embedding), converted so that
it gives the same ids for every string (`tokenizer.model` is the original). No BOS token;
documents end with `</s>` (id {hf_format.EOS_ID}), which also serves as the prefix for
scoring a document from its first token. Context: {cfg.model.block_size} tokens.

## Final metrics (RUN_DIR/metrics.jsonl, up to step {step})

| metric | value |
|---|---|
{rows or "| (none recorded) | |"}

## Training config

```yaml
{to_yaml(cfg).rstrip()}
```
"""

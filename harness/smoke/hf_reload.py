"""The smoke's export check: `harness export --to hf` of the run's final checkpoint, then the
directory loaded back by transformers alone (AutoModelForCausalLM, AutoTokenizer): its logits
against the harness's own model on the same weights, and its token ids against the run's
tokenizer, on validation windows."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from harness.after.export_hf import export
from harness.checkpoint import io as checkpoint_io
from harness.data.shards import TokenShards
from harness.smoke.checks import EXPORT_ATOL, Check, verdict

HF_EXTRA = "pip install -e .[hf]"
WINDOWS = 2  # validation windows scored by both models


def export_and_reload(run_dir: Path, out_dir: Path) -> Check:
    try:
        import transformers
    except ImportError:
        return verdict("export", False, f"transformers is not installed, so the export cannot "
                                        f"be reloaded: {HF_EXTRA}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never ask the Hub
    export(run_dir, out_dir)
    ours = checkpoint_io.load(run_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32).eval()
    seqs = TokenShards.open(ours.cfg.data.out_dir).sequences("val", ours.cfg.model.block_size)
    rows = seqs.batch(list(range(min(WINDOWS, len(seqs)))))[:, :-1]
    ids = torch.from_numpy(rows.astype("int64"))
    with torch.no_grad():
        diff = (ours.model(ids).float() - theirs(ids).logits.float()).abs().max().item()
    tokenizer = checkpoint_io.load_tokenizer(ours.cfg, run_dir)
    text = tokenizer.decode(ids[0].tolist())
    mine = tokenizer.encode(text)
    same_ids = transformers.AutoTokenizer.from_pretrained(out_dir).encode(
        text, add_special_tokens=False) == mine
    return verdict("export", diff <= EXPORT_ATOL and same_ids,
                   f"{out_dir} reloaded by transformers {transformers.__version__} as "
                   f"{type(theirs).__name__}: logits within {diff:.1e} of the harness's "
                   f"(tolerance {EXPORT_ATOL:g}); tokenizer ids "
                   f"{'equal' if same_ids else 'DIFFERENT'} on {len(text)} characters of "
                   f"validation text")

"""`harness eval RUN_DIR_OR_CHECKPOINT --data PATHS`: loss, perplexity and bits per byte of a
trained model on text files, directories or JSONL ("text" field), with the run's tokenizer.

Each document is scored on its own, every token exactly once, predicted from the end-of-text
token </s> before it (as in training, where documents follow one another after </s>) and from
as much of the document before it as a window allows:

  - the first window holds </s> + the first block_size - 1 tokens and scores block_size tokens;
  - each next window scores the next `stride` tokens (default block_size), with the
    block_size - stride tokens before them (and at least one) as context.

At stride = block_size this is exactly lm-evaluation-harness's rolling log-likelihood
(`loglikelihood_rolling`, context_len 1) with </s> as its prefix token, so the totals agree
(tests/after/test_eval_lm_eval.py); a smaller stride gives each token more context at block_size /
stride times the compute. The trailing </s> of a document is not scored: its bytes are none.

bits per byte = total nats / (ln 2 x UTF-8 bytes of the text scored), comparable across
tokenizers; loss = nats per token; perplexity = exp(loss).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from harness.common.errors import HarnessError

IGNORE = -100


@dataclass
class Totals:
    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0
    per_document: list[float] = field(default_factory=list)  # nats of each document

    def summary(self) -> dict:
        loss = self.nats / self.tokens if self.tokens else math.nan
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                "nats": self.nats, "loss": loss,
                "perplexity": math.exp(loss) if self.tokens and loss < 700 else math.inf,
                "bits_per_byte": self.nats / (math.log(2) * self.bytes) if self.bytes else math.nan,
                "bytes_per_token": self.bytes / self.tokens if self.tokens else math.nan}


def windows(n: int, block: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(a, t0, t1) over s = [</s>] + doc (n tokens): the window's input is s[a : t1 - 1] and
    it scores targets s[t0 : t1], t0 >= 1; every target 1..n exactly once."""
    t0, width = 1, block
    while t0 <= n:
        t1 = min(t0 + width, n + 1)
        yield max(0, t1 - 1 - block), t0, t1
        t0, width = t1, stride


def read_documents(paths: list[str], text_field: str = "text") -> Iterator[str]:
    from harness.data.corpus import iter_documents, scan_sources

    if not paths:
        raise HarnessError("harness eval: --data names no file: give text files, directories "
                           "or .jsonl files")
    try:
        sources = scan_sources(list(paths), text_field=text_field)
        for text, _ in iter_documents(sources, text_field):
            yield text
    except HarnessError as err:  # the corpus reader speaks of data.sources
        raise HarnessError(str(err).replace("data.sources", "--data", 1)) from None


class Scorer:
    """Batches windows of many documents through the model; sums nats per document."""

    def __init__(self, model, block: int, stride: int, eos_id: int, batch_size: int = 8,
                 device: str | torch.device = "cpu"):
        if not 1 <= stride <= block:
            raise HarnessError(f"--stride {stride} must be between 1 and the model's block_size "
                               f"({block})")
        self.model, self.block, self.stride, self.eos = model, block, stride, eos_id
        self.batch_size, self.device = batch_size, torch.device(device)
        self._pending: list[tuple[int, list[int], int, int]] = []  # (doc, input, skip, targets)
        self.doc_nats: dict[int, float] = {}

    def add(self, doc: int, ids: list[int]) -> None:
        self.add_stream(doc, [self.eos] + ids)

    def add_stream(self, doc: int, s) -> None:
        """Scores s[1:], each token from the tokens before it (a list or a numpy array)."""
        self.doc_nats.setdefault(doc, 0.0)
        for a, t0, t1 in windows(len(s) - 1, self.block, self.stride):
            row = s[a:t1]  # a memory-mapped shard's slice: read one window at a time
            self._pending.append((doc, row.tolist() if hasattr(row, "tolist") else row,
                                  t0 - a - 1, t1 - t0))
            if len(self._pending) >= self.batch_size:
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        width = max(len(row) - 1 for _, row, _, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for r, (_, row, skip, n) in enumerate(batch):
            x[r, :len(row) - 1] = torch.tensor(row[:-1])
            # right padding: causal attention never lets a real position see it
            y[r, skip:skip + n] = torch.tensor(row[skip + 1:skip + 1 + n])
        with torch.no_grad():
            logits = self.model(x.to(self.device)).float()
            nats = F.cross_entropy(logits.flatten(0, 1), y.to(self.device).flatten(),
                                   ignore_index=IGNORE, reduction="none").view(len(batch), -1)
        for (doc, *_), value in zip(batch, nats.double().sum(dim=1).cpu().tolist()):
            self.doc_nats[doc] += value


def _cut(tokenizer, text: str, ids: list[int], keep: int) -> tuple[list[int], str]:
    """The first `keep` tokens and the text they stand for (a byte-fallback character cut in
    two is left out whole)."""
    while keep > 0:
        prefix = tokenizer.decode(ids[:keep])
        if text.startswith(prefix):
            return ids[:keep], prefix
        keep -= 1
    return [], ""


def check_options(max_tokens: Optional[int], stride: Optional[int], batch_size: int) -> None:
    """The numbers `harness eval` takes, before any checkpoint is read."""
    for flag, value in (("--max-tokens", max_tokens), ("--stride", stride)):
        if value is not None and value < 1:
            raise HarnessError(f"{flag} {value} must be >= 1 (leave {flag} out for the default)")
    if batch_size < 1:
        raise HarnessError(f"--batch-size {batch_size} must be >= 1")


def score_texts(model, tokenizer, texts: Iterable[str], block: int, stride: Optional[int] = None,
                max_tokens: Optional[int] = None, batch_size: int = 8,
                device: str | torch.device = "cpu") -> Totals:
    stride = block if stride is None else stride
    scorer = Scorer(model, block, stride, tokenizer.eos_id, batch_size, device)
    totals = Totals()
    was_training = model.training
    model.eval()
    try:
        for text in texts:
            ids = tokenizer.encode(text)
            if max_tokens is not None and totals.tokens + len(ids) > max_tokens:
                ids, text = _cut(tokenizer, text, ids, max_tokens - totals.tokens)
            if not ids:
                if max_tokens is not None and totals.tokens >= max_tokens:
                    break
                continue
            scorer.add(totals.documents, ids)
            totals.documents += 1
            totals.tokens += len(ids)
            totals.bytes += len(text.encode("utf-8"))
        scorer.flush()
    finally:
        model.train(was_training)
    totals.per_document = [scorer.doc_nats[d] for d in range(totals.documents)]
    totals.nats = float(sum(totals.per_document))
    return totals


def evaluate(source: str, data: list[str], max_tokens: Optional[int] = None,
             stride: Optional[int] = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """The JSON record `harness eval` prints."""
    from harness.checkpoint import io as checkpoint_io

    check_options(max_tokens, stride, batch_size)
    loaded = checkpoint_io.load(source)
    tokenizer = checkpoint_io.load_tokenizer(loaded.cfg, loaded.run_dir)
    block = loaded.cfg.model.block_size
    model = loaded.model.to(device)
    t0 = time.perf_counter()
    totals = score_texts(model, tokenizer, read_documents(data, loaded.cfg.data.jsonl_text_field),
                         block, stride, max_tokens, batch_size, device)
    seconds = time.perf_counter() - t0
    if not totals.tokens:
        raise HarnessError(f"--data {' '.join(data)}: no text to score (empty documents)")
    return {**checkpoint_io.describe(loaded), "data": list(data), **totals.summary(),
            "window": block, "stride": stride or block, "prefix_token": "</s>",
            "seconds": round(seconds, 3), "tokens_per_s": round(totals.tokens / seconds, 1)}

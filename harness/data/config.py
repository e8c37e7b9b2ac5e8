"""The `data` config section: where the text comes from and how it becomes token shards."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from harness.errors import HarnessError

TOKENIZER_TYPES = ("bpe", "unigram")
# byte_fallback needs 256 byte pieces, plus <unk> and </s>, plus at least one more piece
MIN_VOCAB_SIZE = 259


@dataclass
class DataConfig:
    # text files (one document each), directories (recursive) and .jsonl files (one document
    # per line); empty means the built-in corpus: the Python standard library's .py sources
    sources: list[str] = field(default_factory=list)
    jsonl_text_field: str = "text"
    out_dir: str = "data/stdlib"
    tokenizer_model: Optional[str] = None  # an existing sentencepiece .model; skips training
    tokenizer_type: str = "bpe"  # bpe | unigram
    vocab_size: int = 512  # >= 258 byte and special pieces + the distinct characters
    val_fraction: float = 0.01  # of documents, picked by `seed`
    seed: int = 1234
    num_workers: int = 0  # 0: min(cpu_count, 4); workers are only used for inputs > 8 MB
    max_bytes: int = 0  # cap on the source bytes read; 0: no cap
    eval_every: int = 0  # trainer: validation loss every N steps; 0: never
    eval_batches: int = 4  # trainer: batches per validation

    def validate(self) -> None:
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise HarnessError(
                f"data.tokenizer_type={self.tokenizer_type!r} is unknown; use one of "
                f"{', '.join(TOKENIZER_TYPES)}")
        if self.tokenizer_model is None and self.vocab_size < MIN_VOCAB_SIZE:
            raise HarnessError(
                f"data.vocab_size={self.vocab_size} is too small: byte fallback needs 258 "
                f"pieces; set data.vocab_size >= {MIN_VOCAB_SIZE}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise HarnessError(
                f"data.val_fraction={self.val_fraction} must be in [0, 1); e.g. 0.01")
        for key in ("num_workers", "max_bytes", "eval_every"):
            if getattr(self, key) < 0:
                raise HarnessError(f"data.{key}={getattr(self, key)} must be >= 0")
        if self.eval_batches < 1:
            raise HarnessError(f"data.eval_batches={self.eval_batches} must be >= 1")
        if not self.out_dir:
            raise HarnessError("data.out_dir is empty; set it to a directory path")
        if not self.jsonl_text_field:
            raise HarnessError("data.jsonl_text_field is empty; set it to the JSON text key")

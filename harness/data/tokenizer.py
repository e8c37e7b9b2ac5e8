"""A lossless sentencepiece tokenizer: decode(encode(text)) == text for any Unicode text."""
from __future__ import annotations

import hashlib
import io
import itertools
import math
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from harness.common.errors import HarnessError

# The defaults (nmt_nfkc, dummy prefix, whitespace folding) lose newlines and indentation.
LOSSLESS = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    byte_fallback=True,  # characters outside the vocabulary become UTF-8 byte pieces
    character_coverage=1.0,
    max_sentence_length=16384,  # bytes
)
SPECIAL_IDS = dict(unk_id=0, eos_id=1, bos_id=-1, pad_id=-1)
CHUNK_CHARS = 4096  # <= 16384 UTF-8 bytes, so no training chunk is dropped as too long
# enough text for a small vocabulary while training stays at seconds (unigram's EM is ~8x slower)
TRAIN_SAMPLE_BYTES = {"bpe": 8 << 20, "unigram": 1 << 20}
SPACE_MARK = "\u2581"  # sentencepiece's escaped space; a literal one would decode as " "
PROBE = f"def f(x):\n\treturn  x  # é 中文 🙂\r\n{SPACE_MARK}"


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise HarnessError(f"data.tokenizer_model: {self.path} is not a file; fix the path "
                               "or leave it unset to train a tokenizer")
        data = self.path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError:
            raise HarnessError(f"data.tokenizer_model: {self.path} is not a sentencepiece model; "
                               "give a .model file or leave it unset to train one") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.eos_id = self._sp.eos_id()
        self.vocab_size = self._sp.get_piece_size()
        # the UTF-8 byte pieces of U+2581 decode to the character itself, not to a space
        self._mark_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]
        if self.eos_id < 0 or self.decode(self.encode(PROBE)) != PROBE:
            raise HarnessError(f"data.tokenizer_model: {self.path} is not lossless or has no EOS "
                               "piece; leave data.tokenizer_model unset to train a suitable one")

    def encode(self, text: str) -> list[int]:
        if SPACE_MARK not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_MARK)):
            if i:
                ids += self._mark_ids
            ids += self._sp.encode(part)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))


def train_tokenizer(documents: Iterable[str], out_path: Path, model_type: str, vocab_size: int,
                    total_bytes: int) -> Tokenizer:
    """Train on an evenly strided sample of ~TRAIN_SAMPLE_BYTES and write `out_path`."""
    stride = max(1, math.ceil(total_bytes / TRAIN_SAMPLE_BYTES[model_type]))
    errors: list[HarnessError] = []
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_catching(_chunks(documents), stride, errors), model_writer=model,
            model_type=model_type, vocab_size=vocab_size, num_threads=os.cpu_count() or 1,
            minloglevel=2, **LOSSLESS, **SPECIAL_IDS)
    except RuntimeError as e:
        errors.append(_training_error(str(e), vocab_size))
    if errors:
        raise errors[0]
    out_path.write_bytes(model.getvalue())
    return Tokenizer(out_path)


def _training_error(message: str, vocab_size: int) -> HarnessError:
    """sentencepiece's reason, reworded in terms of the config key."""
    key = f"data.vocab_size={vocab_size}"
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return HarnessError(f"{key} is too small: this corpus needs {m[1]} pieces (one per "
                            f"distinct character, plus 258 byte and special pieces); set "
                            f"data.vocab_size >= {m[1]}")
    if m := re.search(r"value <= (\d+)", message):
        return HarnessError(f"{key} is too large for this little text; set data.vocab_size <= "
                            f"{m[1]} or add text to data.sources")
    reason = message.rsplit("] ", 1)[-1].strip() or "no text to train on"
    return HarnessError(f"{key}: sentencepiece cannot train on this corpus: {reason}")


def _catching(chunks: Iterator[str], stride: int, errors: list) -> Iterator[str]:
    """Every stride-th chunk; a bad input's HarnessError is kept for the caller, because
    sentencepiece would turn it into a RuntimeError with a traceback in its message."""
    try:
        yield from itertools.islice(chunks, 0, None, stride)
    except HarnessError as e:
        errors.append(e)


def _chunks(documents: Iterable[str]) -> Iterator[str]:
    """Documents cut into pieces of at most CHUNK_CHARS, preferably after a newline."""
    for text in documents:
        start = 0
        while start < len(text):
            end = start + CHUNK_CHARS
            if end < len(text):
                cut = text.rfind("\n", start, end)
                if cut >= start:
                    end = cut + 1
            yield text[start:end]
            start = end


def piece_bytes(tokenizer_file) -> np.ndarray:
    """UTF-8 bytes each token id stands for in decoded text: a byte piece 1, </s> and <unk>
    0, a normal piece its text (U+2581 is a space). Sums to len(decode(ids).encode()) for any
    sequence that does not cut a character in two."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    table = np.zeros(sp.get_piece_size(), dtype=np.int64)
    for i in range(sp.get_piece_size()):
        if sp.is_byte(i):
            table[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
            table[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return table

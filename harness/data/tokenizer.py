"""A lossless sentencepiece tokenizer: decode(encode(text)) == text for any Unicode text."""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from harness.common.errors import HarnessError
from harness.config.data import DataConfig

log = logging.getLogger("harness")

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
# The training sample, an evenly strided slice of the corpus (train_sample_bytes): at least
# TRAIN_SAMPLE_BYTES (a small vocabulary trains in seconds; unigram's EM is ~8x slower per byte),
# and SAMPLE_BYTES_PER_PIECE per piece asked for: a unigram vocabulary needs that much text to
# seed its pieces (1 MiB of code holds ~14k; 32k failed on 1 MiB, trained on 4 and 8), a BPE
# one to find frequent merges. Measured with sentencepiece 0.2 on Python sources, 2 threads: BPE
# 32k on 32 MiB 15 s, unigram 32k on 8 MiB 70 s (a shared machine).
TRAIN_SAMPLE_BYTES = {"bpe": 8 << 20, "unigram": 1 << 20}
SAMPLE_BYTES_PER_PIECE = {"bpe": 1 << 10, "unigram": 256}
# sentencepiece's trainer holds ~14-22 bytes per sample byte at its peak (measured: BPE +455 MB
# on 32 MiB, unigram +337 MB on 16 MiB); the sample is capped so that it stays under this
TRAIN_MEMORY_BYTES = 2 << 30
TRAINER_BYTES_PER_BYTE = 24
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


def train_sample_bytes(model_type: str, vocab_size: int) -> int:
    """How much text the tokenizer trains on (at most: a smaller corpus is taken whole)."""
    wanted = max(TRAIN_SAMPLE_BYTES[model_type], vocab_size * SAMPLE_BYTES_PER_PIECE[model_type])
    return min(wanted, TRAIN_MEMORY_BYTES // TRAINER_BYTES_PER_BYTE)


def train_tokenizer(documents: Iterable[str], out_path: Path, model_type: str, vocab_size: int,
                    total_bytes: int,
                    threads: int = DataConfig.tokenizer_threads) -> Tokenizer:
    """Train on an evenly strided sample of ~train_sample_bytes of the `total_bytes` corpus
    and write `out_path`, on `threads` threads (data.tokenizer_threads: the result depends on
    the count, so it is the config's, never the machine's)."""
    sample = train_sample_bytes(model_type, vocab_size)
    stride = max(1, math.ceil(total_bytes / sample))
    used = min(sample, total_bytes)
    log.info("tokenizer: training %s %d on %.1f MB of the %.1f MB corpus (every %s%d-character "
             "chunk); sentencepiece holds ~%.0f MB for it", model_type, vocab_size, used / 1e6,
             total_bytes / 1e6, _nth(stride), CHUNK_CHARS, used * TRAINER_BYTES_PER_BYTE / 1e6)
    errors: list[HarnessError] = []
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_catching(_chunks(documents), stride, errors),
            model_writer=model,
            model_type=model_type, vocab_size=vocab_size,
            num_threads=threads, minloglevel=2, **LOSSLESS, **SPECIAL_IDS)
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


def _nth(stride: int) -> str:
    """'22nd ', with its space; '' for 1 (every chunk)."""
    if stride == 1:
        return ""
    last = stride % 10 if stride % 100 not in (11, 12, 13) else 0
    return f"{stride}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(last, 'th')} "


def _catching(chunks: Iterator[str], stride: int, errors: list) -> Iterator[str]:
    """Every stride-th chunk, until the sample would pass the memory bound (uneven chunk
    sizes could overshoot the planned sample); a bad input's HarnessError is kept for the
    caller, because sentencepiece would turn it into a RuntimeError with a traceback in its
    message."""
    room = TRAIN_MEMORY_BYTES // TRAINER_BYTES_PER_BYTE
    try:
        for chunk in itertools.islice(chunks, 0, None, stride):
            room -= len(chunk.encode())
            if room < 0:
                return
            yield chunk
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

"""The `data` config section: where the text comes from and how it becomes token shards."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from harness.common.errors import HarnessError, check_line, check_number

TOKENIZER_TYPES = ("bpe", "unigram")
# byte_fallback needs 256 byte pieces, plus <unk> and </s>, plus at least one more piece
MIN_VOCAB_SIZE = 259
# sentencepiece takes an int32; the largest vocabularies in use are ~256k pieces
MAX_VOCAB_SIZE = 2**24


@dataclass
class DataConfig:
    # text files (one document each), directories (recursive) and .jsonl files (one document
    # per line); empty means the built-in corpus: the Python standard library's .py sources
    sources: list[str] = field(default_factory=list)
    # false: refuse the built-in corpus (data.sources empty) in prepare-data, train and submit;
    # the large presets set it, their model and batch being sized for a real corpus
    allow_toy_corpus: bool = True
    jsonl_text_field: str = "text"  # the JSON key (or Parquet column) of each document's text
    out_dir: str = "data/stdlib"  # where the shards, the tokenizer and manifest.json go
    tokenizer_model: Optional[str] = None  # an existing sentencepiece .model; skips training
    tokenizer_type: str = "bpe"  # bpe | unigram
    # >= 259 (256 byte pieces, <unk>, </s> and one more) and at most MAX_VOCAB_SIZE; also at
    # least the distinct characters of the corpus (prepare-data says what fits)
    vocab_size: int = 512
    # in [0, 1): of the documents, picked by `seed`; a one-document corpus holds out the
    # last val_fraction of its tokens instead (harness/data/prepare.py)
    val_fraction: float = 0.01
    seed: int = 1234  # 0 .. 2**32 - 1
    # prepare-data's tokenizing processes; 0: the cores this process may use (affinity,
    # SLURM_CPUS_PER_TASK, cgroup quota); inputs under 8 MB are tokenized in-process
    num_workers: int = 0
    max_bytes: int = 0  # cap on the source bytes read; 0: no cap
    eval_every: int = 0  # trainer: validation loss every N steps and at the last; 0: never
    # the validation set: this many sequences, spread evenly over the val split, the same at
    # every data-parallel size (harness/callbacks/evaluator.py); 0: eval_batches x
    # train.micro_batch_size (x global_batch_size where the micro batch is not set)
    eval_sequences: int = 0
    eval_batches: int = 4  # trainer: the set's size when eval_sequences is 0 (see above)

    def validate(self) -> None:
        if not isinstance(self.allow_toy_corpus, bool):
            raise HarnessError(f"data.allow_toy_corpus={self.allow_toy_corpus!r} must be true "
                               "or false")
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise HarnessError(
                f"data.tokenizer_type={self.tokenizer_type!r} is unknown; use one of "
                f"{', '.join(TOKENIZER_TYPES)}")
        if self.tokenizer_model is None:
            if isinstance(self.vocab_size, int) and not isinstance(self.vocab_size, bool) \
                    and self.vocab_size < MIN_VOCAB_SIZE:
                raise HarnessError(
                    f"data.vocab_size={self.vocab_size} is too small: byte fallback needs 258 "
                    f"pieces; set data.vocab_size >= {MIN_VOCAB_SIZE}")
            check_number("data.vocab_size", self.vocab_size, MIN_VOCAB_SIZE, MAX_VOCAB_SIZE,
                         integer=True, fix="e.g. 32000")
        else:
            check_number("data.vocab_size", self.vocab_size, 1, MAX_VOCAB_SIZE, integer=True)
        check_number("data.val_fraction", self.val_fraction, 0, 1, high_open=True,
                     fix="e.g. 0.01; 0 holds nothing out")
        check_number("data.seed", self.seed, 0, 2**32 - 1, integer=True)
        check_number("data.num_workers", self.num_workers, 0, 1024, integer=True,
                     fix="0 uses every core this process may run on")
        check_number("data.max_bytes", self.max_bytes, 0, 2**63 - 1, integer=True,
                     fix="0 reads everything")
        check_number("data.eval_every", self.eval_every, 0, 2**31 - 1, integer=True,
                     fix="0 turns evaluation off")
        check_number("data.eval_batches", self.eval_batches, 1, 2**31 - 1, integer=True,
                     fix="e.g. 4")
        check_number("data.eval_sequences", self.eval_sequences, 0, 2**31 - 1, integer=True,
                     fix="e.g. 256; 0 takes eval_batches x train.micro_batch_size")
        if not self.out_dir or not str(self.out_dir).strip():
            raise HarnessError("data.out_dir is empty; set it to a directory path")
        check_line("data.out_dir", self.out_dir)
        if not self.jsonl_text_field:
            raise HarnessError("data.jsonl_text_field is empty; set it to the JSON text key")
        check_line("data.jsonl_text_field", self.jsonl_text_field)
        if self.tokenizer_model is not None:
            check_line("data.tokenizer_model", self.tokenizer_model,
                       fix="set a sentencepiece .model path, or null to train one")
        for i, source in enumerate(self.sources):
            if not isinstance(source, str) or not source.strip():
                raise HarnessError(f"data.sources[{i}] is empty: list files, directories or "
                                   f".jsonl files, e.g. data.sources=[corpus/,more.jsonl]")
            check_line(f"data.sources[{i}]", source)


def check_corpus(cfg: DataConfig, prepared_from_builtin: bool | None = None) -> None:
    """Refuse the built-in corpus where the config says it is not enough (allow_toy_corpus
    false): prepare-data, train and submit all call this, so that they agree.
    `prepared_from_builtin`: what data.out_dir already holds (None: nothing yet); shards of
    other sources, trained on as prepared with data.sources empty, are not the toy corpus."""
    if cfg.sources or cfg.allow_toy_corpus or prepared_from_builtin is False:
        return
    raise HarnessError(
        "data.sources is empty, so this config would train on the built-in toy corpus (the "
        "Python standard library's sources, ~10 MB), not the data its model is sized for: "
        "set data.sources=[corpus/,more.jsonl] (your text files, directories, .jsonl; "
        "docs/data.md), or data.allow_toy_corpus=true to try it on the toy corpus anyway")

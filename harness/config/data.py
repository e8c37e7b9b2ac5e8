"""The `data` config section: where the text comes from and how it becomes token shards."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from harness.common.errors import HarnessError, check_line, check_number

TOKENIZER_TYPES = ("bpe", "unigram")
# byte_fallback needs 256 byte pieces, plus <unk> and </s>, plus at least one more piece
MIN_VOCAB_SIZE = 259
# sentencepiece takes an int32; the largest vocabularies in use are ~256k pieces
MAX_VOCAB_SIZE = 2**24


MIX_NAME = re.compile(r"[a-z0-9_-]{1,32}")
# the mixture sampler's block (harness/data/mixture.py): every source gets at least one of its
# slots, so each share must be at least 1/MIX_BLOCK
MIX_BLOCK = 1 << 16


@dataclass
class MixSource:
    """One source of a weighted mixture (data.mix): prepared on its own into
    data.out_dir/<name>/ with the mixture's one tokenizer, drawn in proportion to its weight
    (or to its token budget)."""
    name: str = ""  # 1-32 of a-z 0-9 _ -: its shards' directory and its metrics' suffix
    sources: list[str] = field(default_factory=list)  # as data.sources: files, dirs, .jsonl
    weight: float = 1.0  # > 0; the weights are normalised to sum 1 (shares of the samples)
    # epochs of this source the run may draw (train.max_steps x the global batch x its share,
    # checked at training start); 0: no cap
    max_repeats: int = 0
    # this source's tokens for the whole run, instead of a weight (every source gives one or
    # none does): the shares are tokens / the budgets' sum, and that sum must be the run's
    # tokens (train.max_steps x global batch x block_size) within one step, checked at
    # training start (harness/data/mix_budget.py); 0: not set, the weight applies
    tokens: int = 0

    def validate(self, key: str) -> None:
        if not isinstance(self.name, str) or not MIX_NAME.fullmatch(self.name):
            raise HarnessError(f"{key}.name={self.name!r} must be 1-32 characters of a-z, 0-9, "
                               f"_ and -, e.g. web or code_py")
        if not self.sources:
            raise HarnessError(f"{key}.sources is empty: list its files, directories or .jsonl "
                               f"files, e.g. {key}.sources=[web/]")
        for i, source in enumerate(self.sources):
            if not isinstance(source, str) or not source.strip():
                raise HarnessError(f"{key}.sources[{i}] is empty: list files, directories or "
                                   f".jsonl files")
            check_line(f"{key}.sources[{i}]", source)
        check_number(f"{key}.weight", self.weight, 0, 1e9, low_open=True,
                     fix="a positive number; the weights are normalised to sum 1")
        check_number(f"{key}.max_repeats", self.max_repeats, 0, 2**31 - 1, integer=True,
                     fix="the epochs of this source the run may draw; 0: no cap")
        check_number(f"{key}.tokens", self.tokens, 0, 2**62, integer=True,
                     fix="this source's token budget for the run; 0: its weight applies")
        if self.tokens and self.weight != 1.0:
            raise HarnessError(f"{key}.tokens={self.tokens} and {key}.weight={self.weight:g} "
                               f"are both set: a token budget replaces the weight; drop "
                               f"{key}.weight")


@dataclass
class DataConfig:
    # text files (one document each), directories (recursive) and .jsonl files (one document
    # per line); empty means the built-in corpus: the Python standard library's .py sources
    sources: list[str] = field(default_factory=list)
    # a weighted mixture instead of data.sources: [{name: web, sources: [web/], weight: 0.7},
    # {name: code, sources: [code.jsonl.zst], weight: 0.3}] (MixSource), or by token budgets
    # ({name: web, sources: [web/], tokens: 7000000000}, ...) summing to the run's tokens;
    # each prepared into out_dir/<name>/ with one tokenizer; empty: data.sources alone
    # (docs/data.md)
    mix: list[MixSource] = field(default_factory=list)
    # a resume whose data.mix weights differ from the checkpoint's: false refuses it, true
    # applies the new weights from the resumed step on (earlier steps keep their samples)
    mix_reweight: bool = False
    # false: refuse the built-in corpus (data.sources empty) in prepare-data, train and submit;
    # the large presets set it, their model and batch being sized for a real corpus
    allow_toy_corpus: bool = True
    jsonl_text_field: str = "text"  # the JSON key (or Parquet column) of each document's text
    out_dir: str = "data/stdlib"  # where the shards, the tokenizer and manifest.json go
    tokenizer_model: Optional[str] = None  # an existing sentencepiece .model; skips training
    tokenizer_type: str = "bpe"  # bpe | unigram
    # sentencepiece's training threads: a fixed count, not the machine's cores, because its
    # trainer makes another tokenizer on another thread count (BPE and unigram alike, measured):
    # the same config trains the same tokenizer on a laptop, a 64-core node and a Slurm array
    tokenizer_threads: int = 16
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
        check_number("data.tokenizer_threads", self.tokenizer_threads, 1, 1024, integer=True,
                     fix="e.g. 16; the tokenizer depends on it, so keep it fixed")
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
        self._validate_mix()

    def _validate_mix(self) -> None:
        if not isinstance(self.mix_reweight, bool):
            raise HarnessError(f"data.mix_reweight={self.mix_reweight!r} must be true or false")
        if self.mix and self.sources:
            raise HarnessError("data.mix and data.sources are both set: a mix names each "
                               "source's files in data.mix[i].sources; set data.sources=[]")
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.mix):
            entry.validate(f"data.mix[{i}]")
            if entry.name in seen:
                raise HarnessError(f"data.mix[{i}].name={entry.name} is the name of "
                                   f"data.mix[{seen[entry.name]}] too: each source needs its own")
            seen[entry.name] = i
        self._validate_budgets()
        budgets = self.mix_budgets()
        for i, share in enumerate(self.mix_shares() if self.mix else []):
            if share * MIX_BLOCK < 1:
                given = (f"tokens={self.mix[i].tokens}" if budgets
                         else f"weight={self.mix[i].weight:g}")
                raise HarnessError(
                    f"data.mix[{i}].{given} is a share of {share:.2g} of the samples, below the "
                    f"1/{MIX_BLOCK} the mixture can draw: raise it or drop the source")

    def _validate_budgets(self) -> None:
        """Every source gives data.mix[i].tokens or none does: budgets and weights are two
        ways of saying the shares, and half of each says neither."""
        given = [i for i, e in enumerate(self.mix) if e.tokens]
        if not given or len(given) == len(self.mix):
            return
        i = given[0]
        j = next(k for k in range(len(self.mix)) if not self.mix[k].tokens)
        raise HarnessError(f"data.mix[{i}].tokens={self.mix[i].tokens} is a token budget but "
                           f"data.mix[{j}].tokens is not set (data.mix[{j}].weight applies): "
                           f"give every source a budget (data.mix[i].tokens) or none")

    def mix_budgets(self) -> list[int]:
        """data.mix's token budgets in order, or [] where the weights apply."""
        if self.mix and all(e.tokens for e in self.mix):
            return [int(e.tokens) for e in self.mix]
        return []

    def mix_shares(self) -> list[float]:
        """data.mix's shares of the samples, summing to 1: the token budgets' or the
        weights' (normalised)."""
        given = self.mix_budgets() or [float(e.weight) for e in self.mix]
        total = sum(given)
        return [float(g) / total for g in given]


def check_corpus(cfg: DataConfig, prepared_from_builtin: bool | None = None) -> None:
    """Refuse the built-in corpus where the config says it is not enough (allow_toy_corpus
    false): prepare-data, train and submit all call this, so that they agree.
    `prepared_from_builtin`: what data.out_dir already holds (None: nothing yet); shards of
    other sources, trained on as prepared with data.sources empty, are not the toy corpus."""
    if cfg.sources or cfg.mix or cfg.allow_toy_corpus or prepared_from_builtin is False:
        return
    raise HarnessError(
        "data.sources is empty, so this config would train on the built-in toy corpus (the "
        "Python standard library's sources, ~10 MB), not the data its model is sized for: "
        "set data.sources=[corpus/,more.jsonl] (your text files, directories, .jsonl; "
        "docs/data.md), or data.allow_toy_corpus=true to try it on the toy corpus anyway")

"""The run's sentencepiece BPE as a Hugging Face fast tokenizer that encodes every string to
the same ids (tokenizer.json + tokenizer_config.json, loaded by AutoTokenizer alone).

Why not transformers' own LlamaTokenizer(Fast) conversion: it maps spaces to U+2581 in a
normalizer, so a literal U+2581 in the text becomes a space piece, while harness.data.tokenizer
encodes it as its three UTF-8 byte pieces; and it registers </s> as a special token that a
literal "</s>" in the text would turn into EOS. Here instead:
  - the vocabulary's pieces are written with real spaces (U+2581 -> " "), so no normalizer is
    needed and a literal U+2581 is simply not in the vocabulary: byte fallback, as ours;
  - the text is split into sentencepiece's "words" (a run of spaces with the characters up to
    the next space; the first word starts the text), which no piece crosses;
  - merges are every split of every piece into two pieces, ranked by the merged piece's score
    (sentencepiece's BPE merges the adjacent pair whose result scores highest);
  - </s> and <unk> are in the vocabulary (their ids) but not in tokenizer.json's
    added_tokens: the `tokenizers` library matches every added token in raw text before the
    model sees it (its encode_special_tokens switch is not saved in the file), so a literal
    "</s>" in text would become EOS. Left out, text is only ever text, as in sentencepiece.
    transformers adds them back as special tokens from tokenizer_config.json, with
    split_special_tokens so that they are not matched in text there either.
Equality with sentencepiece is tested on hard strings and on a corpus, through transformers and
through `tokenizers` alone (tests/after/test_export_hf.py). One difference stays, in decoding
with `tokenizers` alone: </s> decodes as the text "</s>" where sentencepiece writes nothing
(it does not know which ids are special); transformers' decode(..., skip_special_tokens=True)
drops it.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.common.errors import HarnessError

SPACE_MARK = "\u2581"
# sentencepiece ModelProto piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != 2:  # BPE
        raise HarnessError(f"{model_file}: only BPE sentencepiece models convert exactly "
                           f"(data.tokenizer_type=bpe); this one is not BPE")
    if proto.normalizer_spec.add_dummy_prefix or proto.trainer_spec.treat_whitespace_as_suffix:
        raise HarnessError(f"{model_file}: a dummy-prefix or whitespace-suffix sentencepiece "
                           f"model is not the harness's lossless kind: retrain the tokenizer")
    return proto


def build(model_file: Path):
    """A tokenizers.Tokenizer equal to harness.data.tokenizer.Tokenizer(model_file)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    proto = _proto(model_file)
    vocab: dict[str, int] = {}
    scores: dict[str, float] = {}
    for i, p in enumerate(proto.pieces):
        piece = p.piece.replace(SPACE_MARK, " ") if p.type == NORMAL else p.piece
        vocab[piece] = i
        if p.type in (NORMAL, USER_DEFINED):
            scores[piece] = p.score
    unk = next(p.piece for p in proto.pieces if p.type == UNKNOWN)
    model = models.BPE(vocab=vocab, merges=_merges(scores, vocab), unk_token=unk,
                       byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    # sentencepiece's words: the first starts the text, every other one at a run of spaces
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" +[^ ]*|[^ ]+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tok  # no added tokens: see the module docstring


def _merges(scores: dict[str, float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    ranked = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in scores and right in scores:
                ranked.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def save(model_file: Path, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and the original
    tokenizer.model (for people who want sentencepiece itself) in out_dir."""
    proto = _proto(model_file)
    tok = build(model_file)
    tok.save(str(out_dir / "tokenizer.json"))
    eos = next(p.piece for p in proto.pieces if p.type == CONTROL and p.piece != "<s>")
    unk = next(p.piece for p in proto.pieces if p.type == UNKNOWN)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos, "unk_token": unk, "bos_token": None, "pad_token": None,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # a literal "</s>" in text is text, as in sentencepiece
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": eos, "unk_token": unk}, indent=2) + "\n")
    (out_dir / "tokenizer.model").write_bytes(Path(model_file).read_bytes())

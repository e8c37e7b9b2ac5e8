"""`harness sample RUN_DIR_OR_CHECKPOINT`: text from a trained model.

No KV cache (our models' forward has none): every new token re-runs the whole context, up to
the last block_size tokens. A token at context length T costs a full forward over T positions,
O(T^2 d) attention plus O(T d^2) matmuls, where a KV cache would cost one position, O(T d +
d^2): generating N tokens costs about N x T / 2 times the matmul work of a cached decoder.
Fine for looking at samples of small models; for serving, export to Hugging Face (`harness
export --to hf`) and use its cached generate().

temperature 0 is greedy (argmax, the first maximum on ties, as transformers' greedy
generate); otherwise logits / T, restricted to the top_k most likely tokens when top_k > 0,
sampled with a torch.Generator seeded by --seed. An empty prompt starts after </s>, as a
document does. Generation stops at </s> or after max_new_tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

from harness.common.errors import HarnessError, check_number


def generate(model, ids: list[int], max_new_tokens: int, block_size: int, eos_id: int,
             temperature: float = 0.0, top_k: int = 0,
             generator: Optional[torch.Generator] = None) -> list[int]:
    """The new token ids (the prompt not included)."""
    context, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([context[-block_size:]], dtype=torch.long)
            logits = model(x)[0, -1].float()
            token = _pick(logits, temperature, top_k, generator)
            new.append(token)
            context.append(token)
            if token == eos_id:
                break
    return new


def _pick(logits: torch.Tensor, temperature: float, top_k: int,
          generator: Optional[torch.Generator]) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(source: str, prompt: str = "", max_new_tokens: int = 100, temperature: float = 0.8,
           top_k: int = 0, seed: int = 0) -> dict:
    from harness.checkpoint import io as checkpoint_io

    check_number("--max-new-tokens", max_new_tokens, 1, 2**20, integer=True, fix="e.g. 100")
    check_number("--temperature", temperature, 0, 100, fix="0 is greedy; e.g. 0.8")
    check_number("--top-k", top_k, 0, 2**24, integer=True, fix="0 keeps every token")
    check_number("--seed", seed, 0, 2**63 - 1, integer=True)
    loaded = checkpoint_io.load(source)
    tokenizer = checkpoint_io.load_tokenizer(loaded.cfg, loaded.run_dir)
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    if not ids:
        raise HarnessError("--prompt encodes to no tokens")
    generator = torch.Generator().manual_seed(seed)
    new = generate(loaded.model, ids, max_new_tokens, loaded.cfg.model.block_size,
                   tokenizer.eos_id, temperature, top_k, generator)
    ended = bool(new) and new[-1] == tokenizer.eos_id
    text = tokenizer.decode(new[:-1] if ended else new)
    return {"prompt": prompt, "completion": text, "new_tokens": len(new), "ended": ended,
            "ids": new}

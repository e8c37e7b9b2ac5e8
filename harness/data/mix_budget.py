"""Token budgets of a mixture (data.mix[i].tokens) against the run, checked at training start.

A budget is "this many tokens of this source over the run" (OLMo-core's and Dolma's way of
writing a mix); the sampler draws the shares tokens_i / sum(tokens), so the budgets hold only
when the run trains their sum: train.max_steps x global batch x block_size, within one step's
tokens (a sum is rarely a whole number of steps). A budget beyond max_repeats epochs of its
source is refused here too, in the budget's own terms; the exact draws are checked after it
(mixture.check_repeats)."""
from __future__ import annotations

from typing import Sequence

from harness.common.errors import HarnessError
from harness.config.data import MixSource


def check_budgets(mix: Sequence[MixSource], counts: Sequence[int], block_size: int,
                  max_steps: int, global_batch: int) -> None:
    """`counts`: each source's training sequences of `block_size` tokens. Nothing to check
    where the weights apply (no budgets)."""
    budgets = [int(e.tokens) for e in mix]
    if not budgets or not all(budgets):
        return
    per_step = global_batch * block_size
    total, run = sum(budgets), max_steps * per_step
    if abs(total - run) > per_step:
        steps = max(1, (total + per_step // 2) // per_step)
        raise HarnessError(
            f"data.mix's token budgets sum to {total:,} tokens but train.max_steps={max_steps} "
            f"trains {run:,} ({per_step:,} a step: global batch {global_batch} x block_size "
            f"{block_size}): set train.max_steps={steps} to match the budgets, or change "
            f"data.mix[i].tokens")
    for i, (entry, n) in enumerate(zip(mix, counts)):
        have = int(n) * block_size
        if entry.max_repeats and entry.tokens > entry.max_repeats * have:
            raise HarnessError(
                f"data.mix[{i}].tokens={entry.tokens} is {entry.tokens / have:.2f} epochs of "
                f"'{entry.name}' ({have:,} tokens: {int(n):,} sequences of {block_size}), over "
                f"data.mix[{i}].max_repeats={entry.max_repeats}: raise data.mix[{i}].max_repeats, "
                f"lower the budget, or add data")

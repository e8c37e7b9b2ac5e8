"""train/loss/<source> of a data mixture (harness.train.trainer's module doc): on the real
engine, each step's per-source losses equal the same cross-entropy computed by hand in plain
PyTorch on the same batches from the same weights (rows grouped by source), at 1 rank (every
ZeRO stage, the plain and the chunked loss, with a z-loss, which is out of both train/loss and
the per-source losses) and at 2 ranks (torchrun, gloo); weighted by their tokens they average
to train/loss; a source absent from a step has no key; the training itself (losses,
gradients, weights) is bit for bit the run without a mixture, and a step reads the host no
more often.

The mixture is tests/source_loss_worker.mix_data: harness.data.mixture's sampler over real
sequences of three sources, two of different statistics and a rare one (1%: absent from most
steps)."""
from pathlib import Path

import batched
import pytest
import torch
import torch.nn.functional as F
from engine_utils import Record, build, child_env, full_params, plain_training, small_cfg, torchrun
from source_loss_worker import NAMES, mix_data, without_sources

from harness.model.loss import OutputHead
from harness.train.trainer import Trainer

WORKER = str(Path(__file__).parents[1] / "source_loss_worker.py")
# 8 rows a step: 1 rank x 2 rows x 4 micro-steps, or 2 ranks x 2 rows x 2
MIX = ["train.micro_batch_size=2", "train.max_steps=4", "model.dropout=0.0"]


def plain_source_losses(cfg, dp: int, accum: int) -> list[dict]:
    """Per step: the steps' metrics by hand in plain PyTorch (the harness's model, weights and
    AdamW, engine_utils.plain_training) on the ranks' mixture micro-batches: the loss written
    out (mean CE + z_loss x mean log(Z)^2) for the gradients, and train/loss and per source
    the mean token CE (CE alone) with their token counts ("tokens/<name>")."""
    model, opt, sched = plain_training(cfg)
    z = cfg.train.z_loss
    datas = [mix_data(cfg, 2, r, dp) for r in range(dp)]
    steps = []
    for step in range(cfg.train.max_steps):
        sums, counts, total = {}, {}, 0.0
        for r, data in enumerate(datas):
            for k in range(accum):
                consumed = step * 2 * accum * dp
                x, y = data.micro_batch(consumed, k)
                logits = model(x).float()
                ce = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
                lse = torch.logsumexp(logits, -1)
                ((ce.mean() + z * (lse * lse).mean()) / (accum * dp)).backward()
                total += ce.mean().item() / (accum * dp)
                for row, src in enumerate(data.sources(consumed, k).tolist()):
                    name = NAMES[src]
                    sums[name] = sums.get(name, 0.0) + ce[row].sum().item()
                    counts[name] = counts.get(name, 0) + ce.shape[1]
        if cfg.clip.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip.max_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps.append({"train/loss": total,
                      **{f"train/loss/{n}": sums[n] / counts[n] for n in sums},
                      **{f"tokens/{n}": counts[n] for n in counts}})
    return steps


def check_against_plain(metrics: list[dict], want: list[dict], rel: float = 2e-5) -> None:
    assert len(metrics) == len(want)
    for got, ref in zip(metrics, want):
        keys = sorted(k for k in got if k.startswith("train/loss/"))
        assert keys == sorted(k for k in ref if k.startswith("train/loss/"))  # absent: no key
        for k in keys:
            assert got[k] == pytest.approx(ref[k], rel=rel), k
        # token-weighted, the per-source losses average to train/loss
        n = {k: ref[f"tokens/{k.rsplit('/', 1)[1]}"] for k in keys}
        mean = sum(got[k] * n[k] for k in keys) / sum(n.values())
        assert mean == pytest.approx(got["train/loss"], rel=1e-6)
        assert got["train/loss"] == pytest.approx(ref["train/loss"], rel=rel)
    assert any("train/loss/rare" not in m for m in want)  # a source absent from a step
    both = [m for m in want if "train/loss/web" in m and "train/loss/code" in m]
    assert both and any(abs(m["train/loss/web"] - m["train/loss/code"]) > 0.1 for m in both)


ONE_RANK = {  # id: overrides; fp32 (the plain reference's precision) at every ZeRO stage
    "zero0": ["zero.stage=0"],
    "zero1-chunked-zloss": ["zero.stage=1", "train.loss_chunk_tokens=5", "train.z_loss=1e-2"],
    "zero2-zloss": ["zero.stage=2", "train.z_loss=1e-2"],
    "zero3-chunked": ["zero.stage=3", "train.loss_chunk_tokens=7"],
}


@pytest.mark.parametrize("case", ONE_RANK)
def test_one_rank_per_source_losses_equal_plain_pytorch(case):
    cfg = small_cfg(*MIX, "train.grad_accum_steps=4", *ONE_RANK[case])
    built = build(cfg)
    rec = Record()
    Trainer(cfg, built, mix_data(cfg, 2), [rec]).fit()
    check_against_plain(rec.metrics, plain_source_losses(cfg, dp=1, accum=4))


def test_a_mixture_trains_bit_for_bit_as_without_one():
    """The per-row losses are a by-product of the forward: the same losses, gradient norms
    and weights as the same batches without source_names (chunked loss with a z-loss)."""
    cfg = small_cfg(*MIX, "train.grad_accum_steps=2", "zero.stage=1",
                    "train.loss_chunk_tokens=5", "train.z_loss=1e-2")
    runs = []
    for mixed in (True, False):
        built = build(cfg)
        rec = Record()
        data = mix_data(cfg, 2)
        Trainer(cfg, built, data if mixed else without_sources(data), [rec]).fit()
        runs.append((rec.metrics, dict(full_params(built.engine))))
    (mix, mix_params), (plain, plain_params) = runs
    assert any(k.startswith("train/loss/") for k in mix[-1])
    assert not any(k.startswith("train/loss/") for m in plain for k in m)
    for a, b in zip(mix, plain):
        for k in ("train/loss", "train/z_loss", "optim/grad_norm_preclip"):
            assert a[k] == b[k], k
    assert all(torch.equal(mix_params[n], plain_params[n]) for n in plain_params)


@pytest.mark.parametrize("chunk", [0, 3])
def test_row_losses_leave_the_loss_and_its_gradients_bit_for_bit(chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 5, 8, requires_grad=True)
    t = torch.randint(0, 11, (3, 5))
    out = []
    for keep in (False, True):
        head = OutputHead(8, 11)
        torch.nn.init.normal_(head.weight, generator=torch.Generator().manual_seed(1))
        head.z_loss, head.chunk_tokens, head.keep_rows = 1e-2, chunk, keep
        h.grad = None
        loss = head(h, t)
        loss.backward()
        out.append((loss, head.stats, h.grad.clone(), head.weight.grad, head.row_ce))
    (l0, s0, gh0, gw0, rows0), (l1, s1, gh1, gw1, rows1) = out
    assert rows0 is None
    assert torch.equal(l0, l1) and torch.equal(s0, s1)
    assert torch.equal(gh0, gh1) and torch.equal(gw0, gw1)
    logits = F.linear(h.detach(), head.weight.detach())
    ce = F.cross_entropy(logits.transpose(1, 2), t, reduction="none")
    assert torch.allclose(rows1, ce.sum(1), rtol=1e-6)
    assert rows1.sum() / t.numel() == pytest.approx(s1[0].item(), rel=1e-6)


def test_a_mixture_step_reads_the_host_as_often_as_one_without():
    """tests/train/test_host_syncs.py's counters: the per-source sums ride in the step's
    all-reduce and its one read of the means."""
    from collections import Counter

    from test_host_syncs import DataReads, HostReads

    cfg = small_cfg(*MIX, "train.grad_accum_steps=2", "zero.stage=1", "monitor.enabled=false")
    counts = []
    for mixed in (True, False):
        built = build(cfg)
        data = mix_data(cfg, 2)
        trainer = Trainer(cfg, built, data if mixed else without_sources(data))
        trainer.train_step()  # the first step builds caches
        reads = HostReads()
        with reads, DataReads(reads):
            trainer.train_step()
        counts.append(Counter(reads.counts))
    assert counts[1] and counts[0] == counts[1]


TWO_RANKS = {  # id: (overrides, data-parallel size)
    "zero2-chunked-zloss": (["zero.stage=2", "train.loss_chunk_tokens=5", "train.z_loss=1e-2",
                             *MIX, "train.grad_accum_steps=2"], 2),
    # one tensor-parallel group: both ranks hold the same rows and the full loss
    "tp2-zero1": (["zero.stage=1", "parallel.tensor_parallel_size=2", *MIX,
                   "train.grad_accum_steps=4"], 1),
}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("source_losses")
    cases = {case: overrides for case, (overrides, _) in TWO_RANKS.items()}
    return batched.launch(lambda spec: torchrun(2, WORKER, "--cases", str(spec), str(out)),
                          out, cases, child_env())


@pytest.mark.slow
@pytest.mark.parametrize("case", TWO_RANKS)
def test_two_ranks_per_source_losses_equal_plain_pytorch(two_rank_runs, case):
    """Data parallel: each rank's rows are its own, their sums and token counts go through the
    all-reduce. Tensor parallel: each row counts twice in both. Both ranks log the same."""
    d = two_rank_runs.dir(case)
    r0, r1 = [torch.load(d / f"rank{r}.pt", weights_only=False)["metrics"] for r in range(2)]
    for a, b in zip(r0, r1):
        assert {k: v for k, v in a.items() if k.startswith("train/loss")} == {
            k: v for k, v in b.items() if k.startswith("train/loss")}
    overrides, dp = TWO_RANKS[case]
    # the reference is one process: the same run without the tensor-parallel split
    cfg = small_cfg(*(o for o in overrides if not o.startswith("parallel.")))
    check_against_plain(r0, plain_source_losses(cfg, dp=dp, accum=8 // (2 * dp)))

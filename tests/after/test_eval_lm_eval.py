"""`harness eval` agrees with EleutherAI's lm-evaluation-harness on the exported model.

A local perplexity task (defined here, its data a JSONL file written by the test; nothing is
downloaded) scores documents with lm-eval's rolling log-likelihood, `loglikelihood_rolling`:
windows of max_length = block_size tokens that each predict block_size new tokens, the first
from the prefix token (our tokenizer has no BOS, so lm-eval uses EOS, </s>, as we do). That is
`harness eval`'s default stride (block_size); documents here are longer than block_size, so
the windowing itself is compared, not just one forward. Totals within 1e-4 relative.
"""
from __future__ import annotations

import json
import math
import os

import pytest
from trained_runs import VARIANTS, train_run

from harness.cli import main

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # lm-evaluation-harness itself: 20 s of imports and scoring

TASK = """task: harness_local_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_total_loglikelihood_equals_lm_eval(variant, tmp_path, shards_dir, capsys, monkeypatch):
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    run = train_run(tmp_path / "run", shards_dir, *VARIANTS[variant])
    hf = tmp_path / "hf"
    assert main(["export", str(run), "--to", "hf", str(hf)]) == 0
    capsys.readouterr()
    docs = [{"text": "import os\nimport sys\n\n" + "def f(x):\n\treturn x * 2  # é\n" * 12},
            {"text": "class A:\n    pass\n"},
            {"text": "print('中文 🙂')\n" * 9}]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "harness_local_text.yaml").write_text(TASK.format(data=data))

    assert main(["eval", str(run), "--data", str(data)]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours["tokens"] > 64  # longer than one window: the windows are compared too

    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf},dtype=float32", tasks=["harness_local_text"],
        task_manager=TaskManager(include_path=str(tasks)), device="cpu", batch_size=1,
        log_samples=True)
    samples = results["samples"]["harness_local_text"]
    theirs = -sum(_loglikelihood(s) for s in samples)
    assert len(samples) == len(docs)
    assert ours["nats"] == pytest.approx(theirs, rel=1e-4)
    bpb = results["results"]["harness_local_text"]["bits_per_byte,none"]
    assert ours["bits_per_byte"] == pytest.approx(bpb, rel=1e-4)
    assert ours["bytes"] == sum(len(d["text"].encode()) for d in docs)
    assert math.isfinite(theirs) and os.path.isdir(hf)


def _loglikelihood(sample: dict) -> float:
    resp = sample["filtered_resps"][0]
    return float(resp[0] if isinstance(resp, (list, tuple)) else resp)

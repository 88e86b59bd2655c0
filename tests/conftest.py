import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("DEPTHCUT_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"the reference data folder {SHARED_DATA} is missing"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama saved with a tokenizer, as a user's local model folder."""
    from tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    words = "the quick brown fox jumps over the lazy dog while depth pruning removes layers".split()
    lines = [" ".join(words[(i + j) % len(words)] for j in range(40)) for i in range(50)]
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    import json

    path.write_text("".join(json.dumps({"text": line, "id": i}) + "\n" for i, line in enumerate(lines)))
    return path

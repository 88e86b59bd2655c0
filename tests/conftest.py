import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("DEPTHCUT_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEVICE_ENV = "DEPTHCUT_TEST_DEVICE"
DEVICE_KEY = pytest.StashKey[torch.device]()


def pytest_addoption(parser):
    parser.addoption(
        "--device", default=None,
        help=f"where the tests that run a model put it: cpu (default), cuda or cuda:N; also ${DEVICE_ENV}. "
             "`-m device` selects just those tests",
    )


def chosen_device(config) -> torch.device:
    """--device, else $DEPTHCUT_TEST_DEVICE, else cpu; refused when this machine cannot run it."""
    name = config.getoption("--device") or os.environ.get(DEVICE_ENV) or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"--device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise pytest.UsageError(f"--device {name!r} asked for, but this machine has {count} CUDA device(s)")
        return torch.device("cuda", device.index or 0)
    if device.type != "cpu":
        raise pytest.UsageError(f"--device {name!r}: use cpu, cuda or cuda:N")
    return device


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs a model on the --device (given to every test using `device`)")
    device = chosen_device(config)
    config.stash[DEVICE_KEY] = device
    if device.type == "cuda":
        # Float32 matmuls in TF32 carry ~1e-3 relative error: the naive float32/float64 references
        # the tests compare against would need tolerances that hide real mistakes.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pytest_report_header(config):
    device = config.stash[DEVICE_KEY]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    return f"depthcut test device: {device} ({name})"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device the model under test runs on (--device / $DEPTHCUT_TEST_DEVICE, default cpu)."""
    return pytestconfig.stash[DEVICE_KEY]


@pytest.fixture(scope="session")
def tokenizer():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The reference data: $DEPTHCUT_DATA_DIR (a copy, on a machine without ../shared), else ../shared/data."""
    folder = Path(os.environ["DEPTHCUT_DATA_DIR"])
    assert folder.is_dir(), f"the reference data folder {folder} is missing"
    return folder


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



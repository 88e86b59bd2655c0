"""Every architecture in transformers' causal-LM mapping, against a checked-in snapshot of what
happens to it (tests/architecture_outcomes.json).

Each architecture is built tiny (`tests/architectures.py`), or is "not buildable" with its reason.
Each cut of a built one gives a model equal to the original with the removed layers bypassed
(reloaded with plain `from_pretrained`, no weight missing or unused, cached generation equal to
uncached), or is refused with one line and nothing written; in memory and shard by shard. Its
analysis runs (and streams, or the stream refuses); `prune --repair lstsq` repairs it or refuses.

Which of these happens is compared with the snapshot: a cut that was exact and is now refused, a
refusal with another reason, an architecture that no longer builds (or now does), a name transformers
added or dropped: each fails until the snapshot is regenerated on purpose, with the whole file:

    DEPTHCUT_UPDATE_ARCHITECTURES=1 .venv/bin/python -m pytest tests/test_architectures.py

(each test then records what it saw instead of comparing; review `git diff tests/architecture_outcomes.json`
and update the counts of docs/architectures.md, which `python tests/architectures.py` prints).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

import pytest
import torch
from architectures import (
    CUTS,
    NotTiny,
    build_tiny,
    cached_generation_matches,
    check_cut,
    random_ids,
    reason_of,
    saved_folder,
    summary_of,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

ARCHITECTURES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
SNAPSHOT = Path(__file__).with_name("architecture_outcomes.json")
UPDATE = os.environ.get("DEPTHCUT_UPDATE_ARCHITECTURES") == "1"
EXPECTED: dict = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.is_file() else {}
# Updating records every architecture; comparing runs the cut, analysis and repair tests on those
# the snapshot says build (whether each still builds as recorded is test_each_architecture_builds_as_recorded's).
BUILT = ARCHITECTURES if UPDATE else [name for name in ARCHITECTURES if EXPECTED.get(name, {}).get("build") == "ok"]
# Families people prune, and the MoE and hybrid models whose configs describe layers in other ways:
# some cut of each must be exact, not only refused.
MUST_CUT = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "falcon",
            "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "llama4_text", "jamba", "bamba",
            "nemotron_h", "mixtral", "olmoe", "gpt_oss", "qwen3_next", "lfm2", "granitemoehybrid", "smollm3"}
# Shard by shard, the cuts that differ most (the first layer, a block of whole periods): the same
# config rules run on both paths, so the other cuts would add time and no coverage.
STREAMED_CUTS = ("first", "block")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: a second thread only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def snapshot():
    """`snapshot(name, key, observed)`: compares what a test observed with the snapshot's entry, or,
    when updating, records it; the records are merged into the file when the module ends (under a
    lock: several pytest-xdist workers may each hold part of them)."""
    recorded: dict = {}

    def check(name: str, key: str, observed):
        if UPDATE:
            recorded.setdefault(name, {})[key] = observed
            return
        assert name in EXPECTED, f"{name} is not in {SNAPSHOT.name}: regenerate it (see this module's docstring)"
        expected = EXPECTED[name].get(key)
        assert observed == expected, (f"{name}, {key}: {observed!r} where {SNAPSHOT.name} has {expected!r}; "
                                      "if the change is meant, regenerate it (see this module's docstring)")

    yield check
    if recorded:
        _merge(recorded)


def _merge(recorded: dict) -> None:
    with open(SNAPSHOT.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.is_file() else {}
        saved = {name: entry for name, entry in saved.items() if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
        for name, entries in recorded.items():
            entry = {key: value for key, value in saved.get(name, {}).items() if key != "outcome"}
            if entries.get("build", entry.get("build")) != "ok":  # nothing else is known of an unbuilt one
                entry = {}
            entry.update(entries)
            saved[name] = {"outcome": summary_of(entry), **dict(sorted(entry.items()))}
        SNAPSHOT.write_text(json.dumps(dict(sorted(saved.items())), indent=1) + "\n")
    SNAPSHOT.with_suffix(".lock").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """name -> (the tiny model, its saved folder, whether it generates the same with a cache), or
    the reason it cannot be built tiny or run on a CPU ("not buildable: ..."), as a string."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("architectures")

    def get(name: str):
        if name not in cache:
            try:
                model = build_tiny(name)
                with torch.no_grad():
                    model(input_ids=random_ids(), use_cache=False)
                cache[name] = (model, saved_folder(name, model, tokenizer, root), cached_generation_matches(model))
            except NotTiny as error:
                cache[name] = f"not buildable: cannot be built tiny: {error}"
            except Exception as error:  # noqa: BLE001 (recorded in the snapshot, compared there)
                cache[name] = f"not buildable: does not run on a CPU when tiny: {reason_of(error)}"
        return cache[name]

    return get


def built_or_recorded(name: str, built, snapshot):
    """The built model, folder and generation flag; an architecture that does not build fails here
    (when comparing) or is recorded as not buildable (when updating: None, the caller returns)."""
    result = built(name)
    if isinstance(result, str):
        snapshot(name, "build", result)
        return None
    return result


def _plain(message: str, *paths) -> str:
    """A refusal as recorded: the test's temporary paths replaced by names."""
    for path, label in paths:
        message = message.replace(str(path), label)
    return re.sub(r"/tmp/\S+", "<tmp>", message)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_architecture_builds_as_recorded(name, built, snapshot):
    result = built(name)
    snapshot(name, "build", result if isinstance(result, str) else "ok")


@pytest.mark.parametrize("backend", ["memory", "stream"])
@pytest.mark.parametrize("name", BUILT)
def test_every_cut_is_exact_or_refused_as_recorded(name, backend, built, snapshot, tmp_path):
    if (found := built_or_recorded(name, built, snapshot)) is None:
        return
    model, folder, generates = found
    outcomes = {}
    for cut, spec in CUTS.items():
        if backend == "stream" and cut not in STREAMED_CUTS:
            continue
        try:
            outcome = check_cut(model, folder, spec, tmp_path / cut, stream=backend == "stream",
                                original_generates=generates)
        except AssertionError as error:
            raise AssertionError(f"{name}, --layers {spec} ({cut}), {backend}: {error}") from None
        outcomes[cut] = _plain(outcome, (folder, "<model>"), (tmp_path / cut, "<out>"))
    if name in MUST_CUT:
        assert any(outcome == "exact" for outcome in outcomes.values()), outcomes
    snapshot(name, backend, outcomes)


@pytest.mark.parametrize("name", BUILT)
def test_analysis_runs_and_streams_or_refuses_as_recorded(name, built, snapshot, corpus_file, tmp_path):
    """`analyze` works on every architecture that prunes and records each layer's kind; `--stream`
    gives the same distances, or refuses with one line."""
    from depthcut.errors import DepthcutError
    from depthcut.model.layer_kinds import layer_kinds
    from depthcut.pipeline.analyze import analyze_to

    if (found := built_or_recorded(name, built, snapshot)) is None:
        return
    model, folder, _ = found
    options = dict(model=str(folder), data=str(corpus_file), samples=4, seq_len=16, batch_size=2, dtype="float32",
                   metrics=("angular_last_token", "block_influence"), quiet=True)
    try:
        in_memory = analyze_to(**options, out=str(tmp_path / "memory"))
    except DepthcutError as error:  # an architecture whose layers depthcut cannot find: refused, one line
        assert "\n" not in str(error) and not (tmp_path / "memory").exists()
        snapshot(name, "analysis", "refused: " + _plain(str(error), (folder, "<model>")))
        return
    assert in_memory.metadata["layer_kinds"] == layer_kinds(model)
    distances = _matrix(in_memory.metrics["angular_last_token"])
    size = distances.shape[1]
    rows, firsts = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    defined = firsts + rows + 1 <= size  # row n-1, column l: the block [l, l+n) ends inside the stack
    assert torch.isfinite(distances[defined]).all() and torch.isnan(distances[~defined]).all()
    try:
        streamed = analyze_to(**options, out=str(tmp_path / "stream"), stream=True)
    except DepthcutError as error:
        assert "\n" not in str(error) and not (tmp_path / "stream").exists()
        snapshot(name, "analysis", "in memory; the stream refused: " + _plain(str(error), (folder, "<model>")))
        return
    torch.testing.assert_close(_matrix(streamed.metrics["angular_last_token"]), distances, rtol=1e-4, atol=1e-4,
                               equal_nan=True)
    assert streamed.metadata["layer_kinds"] == in_memory.metadata["layer_kinds"]
    snapshot(name, "analysis", "in memory and streamed, the same")


def _matrix(rows) -> torch.Tensor:
    """An analysis matrix (None where a block would run past the last layer) as a tensor, NaN there."""
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in rows], dtype=torch.float64)


@pytest.mark.parametrize("name", BUILT)
def test_repair_works_or_refuses_as_recorded(name, built, snapshot, corpus_file, tmp_path):
    """`prune --repair lstsq` on every architecture that prunes: a model that reloads with every
    weight used and finite logits, or one refusal line and nothing written."""
    from transformers import AutoModelForCausalLM

    from depthcut.errors import DepthcutError
    from depthcut.pipeline.prune import prune_to

    if (found := built_or_recorded(name, built, snapshot)) is None:
        return
    _, folder, _ = found
    out = tmp_path / "repaired"
    try:
        prune_to(model=str(folder), layers="2:6", repair="lstsq", data=str(corpus_file), samples=8, seq_len=16,
                 batch_size=4, dtype="float32", out=str(out), quiet=True, validation_windows=2, repair_policy="warn")
    except DepthcutError as error:
        assert "\n" not in str(error) and not out.exists()
        snapshot(name, "repair", "refused: " + _plain(str(error), (folder, "<model>"), (out, "<out>")))
        return
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.isfinite(reloaded.eval()(input_ids=random_ids(), use_cache=False).logits).all()
    snapshot(name, "repair", "repaired")


@pytest.mark.skipif(UPDATE, reason="the snapshot is being regenerated")
def test_the_snapshot_has_every_architecture_and_no_other():
    assert sorted(EXPECTED) == ARCHITECTURES, (
        f"transformers' causal-LM names differ from {SNAPSHOT.name}'s: added "
        f"{sorted(set(ARCHITECTURES) - set(EXPECTED))}, gone {sorted(set(EXPECTED) - set(ARCHITECTURES))}; "
        "regenerate it (see this module's docstring)")
    for name, entry in EXPECTED.items():
        assert entry["outcome"] == summary_of(entry), name

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tolerance
from transformers import AutoModelForCausalLM

from depthcut.cli import main
from depthcut.io.atomic import atomic_output_dir

DATA = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--quiet"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []


def test_analyze_then_prune_writes_a_reloadable_model(capsys, tmp_path, tiny_llama_dir, corpus_file, device):
    analysis_dir = tmp_path / "analysis"
    code, out, err = run(capsys, "analyze", tiny_llama_dir, "--data", corpus_file, "--out", analysis_dir, *DATA,
                         "--device", device)
    assert code == 0, err
    assert (analysis_dir / "heatmap.png").stat().st_size > 1000
    analysis = json.loads((analysis_dir / "analysis.json").read_text())
    assert analysis["metadata"]["device"].startswith(device.type)
    best = analysis["best_block"]["2"]

    pruned_dir = tmp_path / "pruned"
    code, out, err = run(capsys, "prune", tiny_llama_dir, "--drop", 2, "--analysis", analysis_dir / "analysis.json",
                         "--out", pruned_dir)
    assert code == 0, err
    provenance = json.loads((pruned_dir / "depthcut.json").read_text())
    assert provenance["removed_layers"] == list(range(*best)) and provenance["strategy"] == "angular"
    assert provenance["removed_block"] == best
    assert provenance["block_distance"] == pytest.approx(analysis["metrics"]["angular_last_token"][1][best[0]])
    assert provenance["num_layers_after"] == 4
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (pruned_dir / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert model.config.num_hidden_layers == 4
    assert sum(p.numel() for p in model.parameters()) == provenance["parameters_after"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_prune_without_analysis_analyzes_the_data(capsys, tmp_path, tiny_llama_dir, corpus_file):
    out_dir = tmp_path / "bi"
    code, out, err = run(capsys, "prune", tiny_llama_dir, "--drop", 2, "--strategy", "block-influence",
                         "--data", corpus_file, "--out", out_dir, *DATA)
    assert code == 0, err
    provenance = json.loads((out_dir / "depthcut.json").read_text())
    influence = provenance["analysis"]["metrics"]["block_influence"]
    assert provenance["removed_layers"] == sorted(sorted(range(6), key=lambda i: influence[i])[:2])


def test_explicit_layers_and_deepest(capsys, tmp_path, tiny_llama_dir):
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--layers", "1:3", "--out", tmp_path / "a")
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "depthcut.json").read_text())["removed_layers"] == [1, 2]
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--drop", 2, "--strategy", "deepest", "--out", tmp_path / "b")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "depthcut.json").read_text())["removed_layers"] == [3, 4]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "{tmp}/nope", "--drop", "1"], "not found"),
        (["prune", "{tmp}", "--drop", "1"], "no config.json"),
        (["prune", "{model}", "--drop", "0"], "between 1 and 5"),
        (["prune", "{model}", "--drop", "6", "--strategy", "deepest"], "between 1 and 5"),
        (["prune", "{model}", "--layers", "4:9"], "out of range"),
        (["prune", "{model}", "--layers", "x"], "malformed"),
        (["prune", "{model}", "--drop", "1", "--layers", "1"], "either --drop"),
        (["prune", "{model}", "--drop", "1", "--strategy", "angulr"], "did you mean 'angular'"),
        (["prune", "{model}", "--drop", "1", "--analysis", "{tmp}/none.json"], "does not exist"),
        (["prune", "{model}", "--layers", "1", "--layer-path", "model.nothing"], "no module at layer path"),
        (["analyze", "{model}", "--data", "{empty}"], "holds no text"),
        (["analyze", "{model}", "--data", "{corpus}", "--samples", "5000"], "too short"),
        (["analyze", "{model}", "--data", "{corpus}", "--samples", "0"], "at least 1"),
        (["analyze", "{model}", "--data", "{corpus}", "--dtype", "float8"], "unknown dtype"),
        (["analyze", "{model}", "--data", "{corpus}", "--metrics", "angular_last_token,bi"], "unknown metric 'bi'"),
        (["analyze", "{model}", "--data", "hf:no-such/dataset-xyz"], "cannot open Hugging Face dataset"),
        (["prune", "{model}", "--drop", "2", "--data", "{corpus}", "--seq-len", "0"], "at least 1"),
        (["analyze", "smollm2-135m", "--data", "{corpus}", "--stream", "--device-map", "auto"], "exclude each other"),
        (["analyze", "{model}", "--data", "{corpus}", "--stream", "--device-map", "auto"], "exclude each other"),
        (["analyze", "{model}", "--data", "{corpus}", "--stream", "--spill-dir", "{tmp}/no-dir"], "does not exist"),
    ],
)
def test_bad_input_gives_a_message_and_writes_nothing(capsys, tmp_path, tiny_llama_dir, corpus_file, argv, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fields = {"tmp": tmp_path, "model": tiny_llama_dir, "empty": empty, "corpus": corpus_file}
    out = tmp_path / "out"
    before = _siblings(out)
    code, _, err = run(capsys, *[a.format(**fields) for a in argv], "--out", out, "--quiet")
    assert code == 2
    assert message in err and "Traceback" not in err
    assert _siblings(out) == before  # no output folder, no staging folder


def test_metric_subset_from_the_command_line(capsys, tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "a"
    code, _, err = run(capsys, "analyze", tiny_llama_dir, "--data", corpus_file, "--out", out, "--metrics",
                       "angular_last_token", *DATA)
    assert code == 0, err
    assert list(json.loads((out / "analysis.json").read_text())["metrics"]) == ["angular_last_token"]


def test_existing_output_needs_force(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--layers", "1", "--out", out)
    assert code == 2 and "already exists" in err and (out / "keep.txt").read_text() == "mine"
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--layers", "1", "--out", out, "--force")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_failure_while_writing_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_error_exit_from_the_installed_command_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "depthcut.cli", "prune", str(tmp_path / "missing"), "--drop", "2",
                             "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("depthcut: error:") and "Traceback" not in result.stderr


def test_generate_prints_a_continuation(capsys, tiny_llama_dir, device):
    code, out, err = run(capsys, "generate", tiny_llama_dir, "the quick brown", "--max-new-tokens", 4,
                         "--device", device)
    assert code == 0, err
    assert out.startswith("> the quick brown\n")


def test_stream_analyzes_like_the_in_memory_path(capsys, tmp_path, tiny_llama_dir, corpus_file, monkeypatch, device):
    from depthcut.analysis import checkpoint as streaming_checkpoint

    results = {}
    for name, extra in (("memory", []), ("stream", ["--stream", "--spill-dir", tmp_path])):
        code, _, err = run(capsys, "analyze", tiny_llama_dir, "--data", corpus_file, "--out", tmp_path / name,
                           *DATA, *extra, "--device", device)
        assert code == 0, err
        results[name] = json.loads((tmp_path / name / "analysis.json").read_text())
    assert "streamed" in results["stream"]["metadata"] and "streamed" not in results["memory"]["metadata"]
    for metric, values in results["memory"]["metrics"].items():
        flat = [v for row in values for v in (row if isinstance(row, list) else [row]) if v is not None]
        got = [v for row in results["stream"]["metrics"][metric]
               for v in (row if isinstance(row, list) else [row]) if v is not None]
        assert got == pytest.approx(flat, abs=tolerance(device, 1e-6, 1e-5))
    assert results["stream"]["best_block"] == results["memory"]["best_block"]

    # A machine with too little memory for the weights streams on its own, and says so.
    monkeypatch.setattr(streaming_checkpoint, "available_memory_bytes", lambda where: 1000)
    code, _, err = run(capsys, "analyze", tiny_llama_dir, "--data", corpus_file, "--out", tmp_path / "auto", *DATA,
                       "--device", device)
    assert code == 0 and "analyzing it one layer at a time (--stream)" in err
    assert json.loads((tmp_path / "auto" / "analysis.json").read_text())["metadata"]["streamed"]


def test_too_small_a_disk_for_the_stream_is_an_error_before_any_output(capsys, tmp_path, tiny_llama_dir, corpus_file,
                                                                      monkeypatch):
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10**6, 10**6, 10))
    code, _, err = run(capsys, "analyze", tiny_llama_dir, "--data", corpus_file, "--out", tmp_path / "out", *DATA,
                       "--stream", "--spill-dir", tmp_path)
    assert code == 2 and "GiB free; pass --spill-dir on a bigger disk" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_device_map_loading_gives_the_same_analysis(capsys, tmp_path, tiny_llama_dir, corpus_file, device):
    """--device-map hands placement to accelerate. On a GPU, "auto" places the layers there (one GPU:
    all of them); on a CPU-only machine "cpu" puts every layer on the CPU, which exercises the
    loading path (the placement over several GPUs itself needs several GPUs)."""
    results = []
    mapping = "auto" if device.type == "cuda" else "cpu"
    for name, extra in (("plain", ["--device", device]), ("mapped", ["--device-map", mapping])):
        code, _, err = run(capsys, "analyze", tiny_llama_dir, "--data", corpus_file, "--out", tmp_path / name,
                           *DATA, "--metrics", "angular_last_token", *extra)
        assert code == 0, err
        results.append(json.loads((tmp_path / name / "analysis.json").read_text()))
    plain, mapped = results
    assert mapped["metadata"]["device"].startswith(device.type)
    if device.type == "cpu":
        assert mapped["metrics"] == plain["metrics"]
    else:  # same GPU, same kernels; allow for a different summation order
        flat = [v for row in plain["metrics"]["angular_last_token"] for v in row if v is not None]
        got = [v for row in mapped["metrics"]["angular_last_token"] for v in row if v is not None]
        assert got == pytest.approx(flat, abs=1e-6)

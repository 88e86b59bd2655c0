"""A newcomer's simple mistakes are answered before anything heavy (issue 37): `--drop` beyond the layer
count read from the config or the GGUF header, an existing --out, a misspelled model or command, a
named corpus with no local copy offline. Each is one `depthcut: error:` line, exit 2, nothing
written, and neither torch nor the model was loaded (the command runs in a fresh interpreter that
reports whether torch was ever imported: no model loads without it). Also: the layer-count reader
against gguf-py's, and the data folder found without `make`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from depthcut.cli import main
from depthcut.errors import DepthcutError
from depthcut.evaluation.tasks import PRESETS
from depthcut.io import data
from depthcut.io.gguf_files import open_gguf
from depthcut.model.header import configured_layer_count, gguf_block_count, layer_count
from depthcut.model.source import resolve_model
from depthcut.pipeline import shrink_to
from depthcut.pipeline.configs import PruneConfig, ShrinkConfig
from depthcut.pipeline.preflight import check_before_loading

# Runs the command line in a fresh interpreter, then says whether torch (hence any model) was imported.
RUN_AND_REPORT = ("import sys\nfrom depthcut.cli import main\ncode = main(sys.argv[1:])\n"
                  "print('TORCH', 'torch' in sys.modules)\nsys.exit(code)\n")


def refused_without_torch(*argv, env: dict | None = None) -> str:
    """The one error line of `depthcut ARGV` run afresh, asserting exit 2 and that torch was never imported."""
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, *map(str, argv)], capture_output=True, text=True,
                          check=False, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "TORCH False" in done.stdout, done.stdout + done.stderr[-2000:]
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("depthcut: error: "), done.stderr
    return errors[0]


def test_drop_beyond_the_builtin_models_layers_is_refused_before_loading(tmp_path):
    out = tmp_path / "smaller"
    line = refused_without_torch("shrink", "smollm2-135m", "--drop", 40, "--out", out)
    assert "--drop must be between 1 and 29 for a model of 30 layers, got 40" in line
    line = refused_without_torch("prune", "smollm2-135m", "--drop", 30, "--strategy", "deepest", "--out", out)
    assert "for a model of 30 layers, got 30" in line
    line = refused_without_torch("prune", "smollm2-135m", "--layers", "28:31", "--out", out)
    assert "layer indices [30] are out of range: this model has 30 layers, numbered 0..29" in line
    line = refused_without_torch("shrink", "smollm2-135m", "--fraction", 0.99, "--out", out)
    assert "--fraction 0.99 removes all 30 layers of this model" in line
    check_before_loading(ShrinkConfig(model="smollm2-135m", fraction=0.967, out=str(out)))  # 29 of 30: allowed
    check_before_loading(PruneConfig(model="smollm2-135m", layers="25:30", out=str(out)))
    assert list(tmp_path.iterdir()) == []


def test_drop_beyond_a_folders_configured_layers_is_refused_before_loading(tmp_path, tiny_llama_dir):
    layers = json.loads((tiny_llama_dir / "config.json").read_text())["num_hidden_layers"]
    line = refused_without_torch("shrink", tiny_llama_dir, "--drop", layers, "--out", tmp_path / "out")
    assert f"between 1 and {layers - 1} for a model of {layers} layers, got {layers}" in line
    assert list(tmp_path.iterdir()) == []


def test_the_python_api_refuses_before_loading(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("depthcut.pipeline.shrink.load", no_load)
    with pytest.raises(DepthcutError, match="for a model of 30 layers, got 40"):
        shrink_to(model="smollm2-135m", drop=40, out=str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["prune", "smollm2-135m", "--out", "{out}"], "give either --drop N (with a --strategy) or --layers"),
    (["shrink", "smollm2-135m", "--out", "{out}"], "give one of --drop N, --fraction F or --params P"),
    (["prune", "smollm2-135m", "--drop", "4", "--strategy", "deepest", "--out", "{existing}"], "already exists"),
    (["shrink", "smollm2-135m", "--drop", "4", "--out", "{existing}"], "already exists"),
    (["analyze", "smollm2-135m", "--data", "{tmp}/no-such.jsonl", "--out", "{out}"],
     "data '{tmp}/no-such.jsonl' not found"),
    (["shrink", "smollm2-135m", "--drop", "4", "--validate", "nope.txt", "--out", "{out}"],
     "data 'nope.txt' not found"),
    (["prune", "smollm2-135m", "--drop", "4", "--metrics", "bi", "--out", "{out}"], "unknown metric 'bi'"),
    (["heal", "smollm2-135m", "--teacher", "smolm2-135m", "--data", "c4", "--out", "{out}"],
     "did you mean 'smollm2-135m'"),
])
def test_simple_mistakes_are_refused_before_the_imports(tmp_path, argv, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    fields = {"out": tmp_path / "out", "existing": existing, "tmp": tmp_path}
    line = refused_without_torch(*[a.format(**fields) for a in argv])
    assert message.format(**fields) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and not any(existing.iterdir())


@pytest.mark.parametrize("spelling", ["smolm2-135m", "SmolLM2-135M", "smollm2_135m"])
def test_a_misspelled_builtin_name_gets_a_suggestion_before_any_hub_call(tmp_path, spelling):
    line = refused_without_torch("prune", spelling, "--drop", 8, "--out", tmp_path / "out")
    assert f"model '{spelling}' is not a built-in name, a folder or a file; did you mean 'smollm2-135m'" in line


def test_the_parser_suggests_the_builtin_name_before_asking_for_missing_options(capsys):
    assert main(["prune", "smolm2-135m"]) == 2  # no --out: the name is the first thing to put right
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument MODEL: model 'smolm2-135m'" in err and "did you mean 'smollm2-135m'" in err
    assert main(["eval", "smollm2-135m", "--baseline", "SmolLM2-135M", "--loss", "c4"]) == 2
    assert "argument --baseline: model 'SmolLM2-135M'" in capsys.readouterr().err


def test_names_far_from_a_builtin_one_stay_hub_ids():
    for spec in ("gpt2", "Qwen/Qwen3-0.6B", "HuggingFaceTB/SmolLM2-135M"):
        assert resolve_model(spec).is_hub_id


def test_a_hub_id_not_in_the_cache_is_refused_offline_with_a_suggestion(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    line = refused_without_torch("prune", "HuggingFaceTB/SmolLM2-135M", "--drop", 8, "--out", tmp_path / "out",
                                 env=env)
    assert "not in the Hugging Face cache, and HF_HUB_OFFLINE is set" in line
    assert "did you mean the built-in 'smollm2-135m'" in line


def test_stream_needs_a_local_folder_when_the_hub_may_be_asked(capsys, tmp_path, corpus_file, monkeypatch):
    # online, a hub id passes the early checks (nothing is downloaded to check it); --stream refuses it
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code = main(["analyze", "someone/some-hub-model", "--data", str(corpus_file), "--stream",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2 and "--stream needs a local folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, suggestion", [(["shirnk"], "shrink"), (["anlyze"], "analyze"),
                                              (["prune", "m", "--repair", "lstq"], "lstsq"),
                                              (["eval", "m", "--scoring", "Packed"], "packed")])
def test_a_misspelled_command_or_choice_gets_a_suggestion(capsys, argv, suggestion):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice" in err and f"did you mean '{suggestion}'?" in err


def test_an_unrelated_word_gets_no_suggestion(capsys):
    assert main(["xyzzy"]) == 2
    assert "did you mean" not in capsys.readouterr().err


# --- the data folder -------------------------------------------------------------------------------

@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A source checkout (pyproject.toml) with `shared/data/c4/...` beside it, as data.py would find it."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text("")
    folder = tmp_path / "shared" / "data"
    (folder / "c4").mkdir(parents=True)
    (folder / "c4" / "c4_validation_2k.jsonl").write_text('{"text": "a local document"}\n')
    monkeypatch.setattr(data, "CHECKOUT", project)
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", folder)
    monkeypatch.delenv("DEPTHCUT_DATA_DIR", raising=False)
    return folder


def test_without_the_variable_a_checkouts_shared_data_is_the_data_folder(checkout):
    assert data.data_dir() == checkout
    source = data.load_texts("c4")
    assert source.documents == ["a local document"] and str(checkout) in source.description


def test_an_installed_package_has_no_default_folder(checkout, monkeypatch):
    (checkout.parent.parent / "project" / "pyproject.toml").unlink()
    assert data.data_dir() is None


def test_the_variable_wins_and_set_empty_means_no_folder(checkout, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHCUT_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path
    monkeypatch.setenv("DEPTHCUT_DATA_DIR", "")
    assert data.data_dir() is None


def test_c4_offline_without_a_local_copy_is_one_line_naming_the_variable_and_folder(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DEPTHCUT_DATA_DIR": ""}
    line = refused_without_torch("analyze", "smollm2-135m", "--data", "c4", "--out", tmp_path / "out", env=env)
    assert line == ("depthcut: error: c4: no local copy (DEPTHCUT_DATA_DIR is set empty: no data folder); set "
                    "DEPTHCUT_DATA_DIR to a folder with c4/c4_validation_2k.jsonl, or go online for "
                    "hf:allenai/c4:en:validation (HF_HUB_OFFLINE is set)")


def test_unset_and_no_folder_names_where_it_looked(checkout, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", checkout.parent / "absent")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DepthcutError) as error:
        data.load_texts("c4")
    assert str(error.value).startswith(f"c4: no local copy (DEPTHCUT_DATA_DIR is not set; looked in "
                                       f"{checkout.parent / 'absent'}); set DEPTHCUT_DATA_DIR")


# --- the layer count without the weights ------------------------------------------------------------

def test_the_gguf_header_gives_the_layer_count_gguf_py_reads():
    source = resolve_model("smollm2-135m")
    path = Path(source.location) / source.gguf_file
    assert gguf_block_count(path) == open_gguf(path).block_count == layer_count(source) == 30


def test_the_gguf_reader_skips_arrays_before_the_count_and_gives_up_on_junk(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list([f"token{i}" for i in range(1000)])  # a string array before the count
    writer.add_array("llama.layer_scales", [0.5, 1.5, 2.5])
    writer.add_block_count(7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_block_count(path) == open_gguf(path).block_count == 7
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    assert gguf_block_count(junk) is None
    junk.write_bytes(path.read_bytes()[:200])  # cut inside the token list
    assert gguf_block_count(junk) is None


@pytest.mark.parametrize("config, expected", [
    ({"num_hidden_layers": 6}, 6),
    ({"n_layer": 12, "model_type": "gpt2"}, 12),
    ({"num_hidden_layers": 40, "text_config": {"num_hidden_layers": 26}, "vision_config": {}}, 26),
    ({"text_config": {}, "num_hidden_layers": 3}, None),  # the text config's own default decides: unknown here
    ({"num_hidden_layers": True}, None),
    ([1, 2], None),
])
def test_the_configured_layer_count(tmp_path, config, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert configured_layer_count(path) == expected


def test_a_layer_path_leaves_the_count_to_the_load(tiny_llama_dir):
    source = resolve_model(str(tiny_llama_dir))
    assert layer_count(source) == json.loads((tiny_llama_dir / "config.json").read_text())["num_hidden_layers"]
    assert layer_count(source, layer_path="model.layers") is None


def test_the_help_of_tasks_names_every_task_of_the_retained_preset(capsys):
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(task in text.split("retained (")[1].split(")")[0] for task in PRESETS["retained"])


def test_the_help_of_shrink_repairs_gives_its_names_and_default(capsys):
    assert main(["shrink", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "comma-separated: cosine, lstsq, magnitude, or none" in text
    assert "(default: all: none,cosine,lstsq,magnitude)" in text

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
        if item.nodeid.split("/")[-1].startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


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


# Tiny-model tests that run whole commands in subprocesses (llama.cpp, several processes, signals,
# killed runs) for a quarter of a minute or more each: `make test` runs them, `make test-fast` skips
# them (marked `slow` here rather than in each file, so the list of what the edit loop leaves out
# is in one place; measured with --durations in the full suite).
SLOW_TESTS = (
    "test_gguf.py::test_analyze_stream_reads_a_gguf_layer_by_layer_as_the_command",
    "test_gguf.py::test_llama_cpp_reads_the_sliced_per_layer_arrays",
    "test_gguf.py::test_tiny_pruned_ggufs_of_several_architectures_run_in_llama_cpp",
    "test_heal.py::test_a_killed_run_resumes_to_the_same_weights",
    "test_heal.py::test_two_processes_train_data_parallel_and_agree",
    "test_eval_harness.py::test_lm_evals_command_line_with_depthcut",
    "test_eval_harness.py::test_answers_equal_lm_evals_hf_model_on_a_tiny_model[mmlu]",
    "test_output_safety.py::test_heal_sigterm_keeps_checkpoints_for_resume",
    "test_output_safety.py::test_after_sigkill_a_rerun_removes_the_leftovers_and_says_so",
    "test_output_safety.py::test_a_second_run_at_the_same_out_fails_at_once_and_the_first_result_is_whole",
    "test_layer_config.py::test_cli_refuses_an_unknown_layer_field_in_one_line_and_allow_goes_on",
    "test_distributed_analysis.py::test_eval_in_two_processes",
    "test_distributed_analysis.py::test_two_processes_give_the_single_process_result",
    "test_eval_cli.py::test_eval_bad_input",
    "test_eval_cli.py::test_missing_task_data_says_where_it_looked",
    "test_device.py::test_the_option_outranks_the_environment_and_a_missing_device_is_refused",
    "test_shrink.py::test_shrink_writes_the_model_its_table_scored",
    "test_sweep.py::test_report_renders_in_headless_chromium_with_every_figure_loaded",
    "test_output_safety.py::test_two_runs_started_together_one_wins_whole",
    "test_output_safety.py::test_sighup_cleans_up_too",
    "test_output_safety.py::test_sigterm_cleans_up_like_ctrl_c",
    "test_output_safety.py::test_a_sweep_folder_follows_the_same_rules",
    "test_eval_tasks.py::test_any_lm_eval_task_resolves_and_unknown_names_get_suggestions",
    "test_eval_tasks.py::test_missing_local_data_falls_back_to_lm_eval_and_says_where_it_looked",
    "test_eval_harness.py::test_answers_equal_lm_evals_hf_model_on_a_tiny_model[hellaswag]",
    "test_eval_harness.py::test_every_scoring_mode_gives_lm_evals_answers",
    "test_retained.py::test_eval_against_a_baseline_reports_what_was_retained",
    "test_heal.py::test_resume_refuses_a_checkpoint_of_another_run",
    "test_shrink_steps.py::test_a_heal_that_helps_is_kept_and_is_what_is_written",
    "test_shrink_steps.py::test_a_heal_that_hurts_is_not_kept",
    "test_shrink_steps.py::test_shrink_evaluates_what_it_wrote_against_the_model",
    "test_shrink_steps.py::test_one_pass_fits_every_repair_as_its_own_pass_would",
    "test_eval_harness.py::test_wikitext_runs_on_the_local_copy_as_hflm_scores_it",
)


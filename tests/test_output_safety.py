"""Output safety (issue 12): concurrent runs at one --out, folders that appear mid-run, signals and
kills at several points followed by a rerun, full and read-only destinations.

Every command test asserts the exit code, one error line, no traceback, nothing left behind and
nothing of the user's touched. Processes, not threads: the real `depthcut` command runs in a
subprocess, paused at a named point by a small wrapper (HOOKED) so that a signal lands there.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from depthcut.cli import main
from depthcut.errors import DepthcutError
from depthcut.io import atomic
from depthcut.io.atomic import atomic_output_dir, atomic_output_file
from depthcut.io.signals import critical
from depthcut.sweep.results import ResultsLog

# Runs `depthcut ARGV...`, pausing at POINT: writes MARKER there, then waits for the file GO (or 120 s).
HOOKED = r'''
import sys, time
from pathlib import Path

marker, go, point, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]

def pause():
    marker.write_text(str(time.time()))
    for _ in range(2400):
        if go.exists():
            return
        time.sleep(0.05)

import depthcut.io.atomic as atomic

def after(module, name):
    original = getattr(module, name)
    def hooked(*args, **kwargs):
        result = original(*args, **kwargs)
        pause()
        return result
    setattr(module, name, hooked)

def before(module, name):
    original = getattr(module, name)
    def hooked(*args, **kwargs):
        pause()
        return original(*args, **kwargs)
    setattr(module, name, hooked)

if point == "claimed":        # --out locked, the model not loaded yet
    import depthcut.io.claims as claims
    after(claims, "claim_output")
elif point == "loaded":       # the model loaded, nothing written yet
    import depthcut.model.loading as models
    after(models, "load_model")
elif point == "writing":      # weights written into the temporary sibling, the rest not yet
    before(atomic, "write_json")
elif point == "publishing":   # the temporary sibling complete, about to become --out
    before(atomic, "_publish")
elif point == "checkpointed": # heal: the first checkpoint written, training goes on
    import depthcut.healing.trainer as trainer
    after(trainer, "save_checkpoint")

from depthcut.cli import main
sys.exit(main(argv))
'''

PRUNE = ["prune", "{model}", "--layers", "1", "--out", "{out}", "--quiet"]


def _command(*argv) -> list[str]:
    return [sys.executable, "-m", "depthcut.cli", *map(str, argv)]


def _hidden(folder: Path) -> list[str]:
    """Temporaries and lock files in `folder` (names starting with a dot)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("depthcut: error:")]


def _assert_one_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = _error_lines(err)
    assert len(errors) == 1 and message in errors[0], err


def _assert_pruned_model(folder: Path, layers: int = 5) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == layers
    assert json.loads((folder / "depthcut.json").read_text())["num_layers_after"] == layers


class Hooked:
    """`depthcut ARGV` in a subprocess that pauses at `point` until released."""

    def __init__(self, tmp_path: Path, point: str, argv: list[str], name: str = "hook"):
        script = tmp_path / "hooked.py"
        script.write_text(HOOKED)
        self.marker, self.go = tmp_path / f"{name}.reached", tmp_path / f"{name}.go"
        self.process = subprocess.Popen([sys.executable, str(script), str(self.marker), str(self.go), point,
                                         *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for_point(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not self.marker.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"exited before the point: {self.process.communicate()}")
            assert time.time() < deadline, "the point was never reached"
            time.sleep(0.05)

    def release(self) -> None:
        self.go.write_text("go")

    def finish(self, timeout: float = 180) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out, err


def _argv(template: list[str], **fields) -> list[str]:
    return [a.format(**{k: str(v) for k, v in fields.items()}) for a in template]


# --- concurrent runs ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_at_the_same_out_fails_at_once_and_the_first_result_is_whole(tmp_path, tiny_llama_dir):
    out = tmp_path / "runs" / "pruned"
    first = Hooked(tmp_path, "loaded", _argv(PRUNE, model=tiny_llama_dir, out=out))
    first.wait_for_point()
    began = time.time()
    second = subprocess.run(_command(*_argv(PRUNE, model=tiny_llama_dir, out=out)), capture_output=True, text=True, check=False)
    _assert_one_error(second.returncode, second.stderr, f"another depthcut run (process {first.process.pid}) is "
                                                        f"writing {out}")
    assert "loading" not in second.stderr  # failed before loading anything
    assert time.time() - began < 60
    first.release()
    code, _, err = first.finish()
    assert code == 0, err
    _assert_pruned_model(out)
    assert _hidden(out.parent) == []


@pytest.mark.slow
def test_two_runs_started_together_one_wins_whole(tmp_path, tiny_llama_dir):
    """Unpaused: which one wins, and whether they overlap at all, is up to the machine."""
    out = tmp_path / "pruned"
    runs = [subprocess.Popen(_command(*_argv(PRUNE, model=tiny_llama_dir, out=out)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser and len(_error_lines(loser)) == 1
    assert "another depthcut run" in loser or "already exists" in loser, loser
    _assert_pruned_model(out)
    assert _hidden(tmp_path) == []


def test_a_claim_in_this_process_blocks_a_second_claim_in_another(tmp_path):
    from depthcut.io.claims import claim_output, release_claims

    out = tmp_path / "out"
    claim_output(out)
    try:
        probe = subprocess.run([sys.executable, "-c", f"from depthcut.io.claims import claim_output as c; c(r'{out}')"],
                               capture_output=True, text=True, check=False)
        assert probe.returncode != 0 and f"(process {os.getpid()}) is writing" in probe.stderr
    finally:
        release_claims()
    assert list(tmp_path.iterdir()) == []


# --- a folder or file that appears at --out while the command runs --------------------------------

def _appear_at_publish(monkeypatch, make):
    original = atomic._publish

    def publish(staging, claim):
        make(claim.out)
        return original(staging, claim)

    monkeypatch.setattr(atomic, "_publish", publish)


def _users_folder(path: Path) -> None:
    path.mkdir()
    (path / "mine.txt").write_text("the user's")


def test_a_folder_created_at_out_mid_run_is_never_deleted(capsys, monkeypatch, tmp_path, tiny_llama_dir):
    out = tmp_path / "pruned"
    _appear_at_publish(monkeypatch, _users_folder)
    code = main(_argv(PRUNE, model=tiny_llama_dir, out=out))
    _assert_one_error(code, capsys.readouterr().err, "was created by something else while this command ran")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "the user's"
    assert _hidden(tmp_path) == []


def test_with_force_only_the_out_seen_at_the_start_is_replaced(capsys, monkeypatch, tmp_path, tiny_llama_dir):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def swap(path):  # the user replaces the folder by another while the command runs
        path.rename(tmp_path / "moved-away")
        _users_folder(path)

    _appear_at_publish(monkeypatch, swap)
    code = main(_argv(PRUNE, model=tiny_llama_dir, out=out) + ["--force"])
    _assert_one_error(code, capsys.readouterr().err, "was replaced by something else while this command ran")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert (tmp_path / "moved-away" / "old.txt").read_text() == "old"
    assert _hidden(tmp_path) == []


def test_a_result_file_created_mid_run_is_never_replaced(capsys, monkeypatch, tmp_path, tiny_llama_dir):
    out = tmp_path / "eval.json"
    _appear_at_publish(monkeypatch, lambda path: path.write_text("the user's"))
    code = main(["eval", str(tiny_llama_dir), "--loss", "c4", "--loss-samples", "2", "--loss-seq-len", "16",
                 "--out", str(out), "--quiet"])
    _assert_one_error(code, capsys.readouterr().err, "was created by something else")
    assert out.read_text() == "the user's"
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_publishing_without_renameat2_still_never_replaces(monkeypatch, tmp_path, kind):
    monkeypatch.setattr(atomic, "_renameat2_function", lambda: None)
    out = tmp_path / "out"
    writer = atomic_output_dir if kind == "dir" else atomic_output_file

    def write(staging, text):
        (staging / "x.txt" if kind == "dir" else staging).write_text(text)

    with writer(out) as staging:
        write(staging, "first")
    with pytest.raises(DepthcutError, match="created by something else"), writer(tmp_path / "other") as staging:
        write(staging, "second")
        _users_folder(tmp_path / "other") if kind == "dir" else (tmp_path / "other").write_text("the user's")
    with writer(out, force=True) as staging:
        write(staging, "replaced")
    assert (out / "x.txt" if kind == "dir" else out).read_text() == "replaced"
    assert _hidden(tmp_path) == []


# --- signals and kills at several points, then a rerun ------------------------------------------

@pytest.mark.parametrize("point", ["claimed", "writing", "publishing"])
@pytest.mark.slow
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, tiny_llama_dir, point):
    out = tmp_path / "runs" / "pruned"  # runs/ is made by the command: it goes too
    run = Hooked(tmp_path, point, _argv(PRUNE, model=tiny_llama_dir, out=out))
    run.wait_for_point()
    run.process.send_signal(signal.SIGTERM)
    code, _, err = run.finish()
    assert code == 143, err
    assert "depthcut: terminated by SIGTERM; unfinished output was removed" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hooked.py", "hook.reached"])


@pytest.mark.slow
def test_sighup_cleans_up_too(tmp_path, tiny_llama_dir):
    out = tmp_path / "pruned"
    run = Hooked(tmp_path, "writing", _argv(PRUNE, model=tiny_llama_dir, out=out))
    run.wait_for_point()
    run.process.send_signal(signal.SIGHUP)
    code, _, err = run.finish()
    assert code == 129 and "terminated by SIGHUP" in err and "Traceback" not in err
    assert not out.exists() and _hidden(tmp_path) == []


def test_a_signal_during_a_publish_takes_effect_when_it_is_done():
    from depthcut.io.signals import Terminated, handle_signals

    finished = []
    with pytest.raises(Terminated), handle_signals():
        with critical():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run (and deferred the signal) by now
            finished.append("publish")
        finished.append("after")  # never reached: the signal is handled as the publish ends
    assert finished == ["publish"]


@pytest.mark.parametrize("point", ["claimed", "writing", "publishing"])
@pytest.mark.slow
def test_after_sigkill_a_rerun_removes_the_leftovers_and_says_so(tmp_path, tiny_llama_dir, point):
    out = tmp_path / "pruned"
    run = Hooked(tmp_path, point, _argv(PRUNE, model=tiny_llama_dir, out=out))
    run.wait_for_point()
    run.process.kill()
    assert run.finish()[0] == -signal.SIGKILL
    left = _hidden(tmp_path)
    if point != "claimed":
        assert any(name.startswith(f".pruned.tmp-{run.process.pid}-") for name in left), left
    rerun = subprocess.run(_command(*_argv(PRUNE, model=tiny_llama_dir, out=out)), capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    if point != "claimed":
        assert f"left behind by an earlier run that was killed (process {run.process.pid} is gone)" in rerun.stderr
    _assert_pruned_model(out)
    assert _hidden(tmp_path) == []


def test_a_temporary_of_a_live_process_is_left_alone(tmp_path):
    alive = tmp_path / f".out.tmp-{os.getppid()}-0123abcd"
    alive.mkdir()
    with atomic_output_dir(tmp_path / "out") as staging:
        (staging / "x").write_text("x")
    assert alive.is_dir()


@pytest.mark.slow
def test_heal_sigterm_keeps_checkpoints_for_resume_and_the_totals_count_the_whole_run(tmp_path, tiny_llama_dir,
                                                                                        corpus_file):
    out = tmp_path / "healed"
    argv = ["heal", tiny_llama_dir, "--data", corpus_file, "--out", out, "--steps", "6", "--seq-len", "32",
            "--batch-size", "2", "--rank", "4", "--warmup-steps", "1", "--checkpoint-every", "2",
            "--heldout-windows", "2", "--quiet"]
    run = Hooked(tmp_path, "checkpointed", [str(a) for a in argv])
    run.wait_for_point()
    run.process.send_signal(signal.SIGTERM)
    code, _, err = run.finish()
    assert code == 143 and "Traceback" not in err, err
    assert "checkpoints kept in" in err and "--resume" in err
    assert not out.exists() and _hidden(tmp_path) == []
    checkpoints = tmp_path / "healed-checkpoints"
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith("step-")] == ["step-0000002"]
    assert _hidden(checkpoints) == []

    resumed = subprocess.run(_command(*argv, "--resume"), capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    healing = json.loads((out / "depthcut.json").read_text())["healing"]
    assert (healing["steps"], healing["resumed_from_step"], healing["steps_this_run"]) == (6, 2, 4)
    assert healing["tokens"] == 6 * 2 * 32 and healing["tokens_this_run"] == 4 * 2 * 32
    assert "6 steps" in resumed.stdout
    assert not checkpoints.exists() and _hidden(tmp_path) == []


def test_a_stale_checkpoint_temporary_is_removed_and_reported(tmp_path, capsys):
    from depthcut.healing.checkpoint import save_checkpoint

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=False)
    stale = tmp_path / f".step-0000002.tmp-{int(gone.stdout)}-0123abcd"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"half")
    save_checkpoint(tmp_path, 4, {"x": 1}, {"rank": 4})
    assert not stale.exists() and "left behind by an earlier run" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000004"]


# --- full and read-only destinations ------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (the tests run as root here); skipped where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def mount_it(*options):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8); test_a_failing_disk_injected_* stand in")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=256k", *options]), "tmpfs",
                                 str(mount)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        return mount

    yield mount_it
    subprocess.run(["umount", str(mount)], capture_output=True, check=False)


def _fill(folder: Path, leave: int) -> Path:
    """Fill the disk of `folder` until about `leave` bytes are free; returns the filler file."""
    filler = folder / "filler.bin"
    filler.write_bytes(b"\0" * max(shutil.disk_usage(folder).free - leave, 0))
    return filler


def test_a_full_disk_while_writing_is_one_error_and_nothing_is_left(capsys, small_disk, tiny_llama_dir, corpus_file):
    disk = small_disk()
    filler = _fill(disk, 0)
    size = filler.stat().st_size
    out = disk / "analysis"
    code = main(["analyze", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(out), "--samples", "4",
                 "--seq-len", "16", "--batch-size", "2", "--quiet"])
    _assert_one_error(code, capsys.readouterr().err, f"no space left on the disk holding {disk} while writing {out}")
    assert sorted(p.name for p in disk.iterdir()) == ["filler.bin"] and filler.stat().st_size == size


def test_a_disk_too_small_for_the_pruned_weights_fails_before_loading(capsys, small_disk, tiny_llama_dir):
    disk = small_disk()
    _fill(disk, 64 * 1024)
    code = main(_argv(PRUNE, model=tiny_llama_dir, out=disk / "pruned"))
    err = capsys.readouterr().err
    _assert_one_error(code, err, "the pruned model needs about")
    assert "loading" not in err
    assert sorted(p.name for p in disk.iterdir()) == ["filler.bin"]


def test_a_full_disk_mid_write_of_weights(capsys, small_disk, tiny_llama_dir):
    disk = small_disk()
    _fill(disk, 212 * 1024)  # passes the up-front estimate (206 KiB of kept weights), not the whole model
    code = main(_argv(PRUNE, model=tiny_llama_dir, out=disk / "pruned"))
    _assert_one_error(code, capsys.readouterr().err, "no space left on the disk holding")
    assert sorted(p.name for p in disk.iterdir()) == ["filler.bin"]


@pytest.mark.parametrize("command", ["prune", "eval", "analyze"])
def test_a_read_only_destination_fails_before_loading(capsys, small_disk, tiny_llama_dir, corpus_file, command):
    disk = small_disk("ro")
    argv = {"prune": _argv(PRUNE, model=tiny_llama_dir, out=disk / "a" / "pruned"),
            "eval": ["eval", str(tiny_llama_dir), "--loss", "c4", "--out", str(disk / "e.json")],
            "analyze": ["analyze", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(disk / "a")]}[command]
    code = main(argv)
    err = capsys.readouterr().err
    _assert_one_error(code, err, "is not writable (read-only file system); choose another --out")
    assert "loading" not in err and list(disk.iterdir()) == []


@pytest.mark.parametrize("code_name", ["ENOSPC", "EROFS", "EIO"])
def test_a_failing_disk_injected_at_the_write_seam(capsys, monkeypatch, tmp_path, tiny_llama_dir, code_name):
    """Where no tmpfs can be mounted: the same failures injected where the output is written."""
    code_number = getattr(errno, code_name)

    def failing(path, data):
        raise OSError(code_number, os.strerror(code_number), str(path))

    import depthcut.io.model_folder
    import depthcut.pipeline.prune_backends

    # where each backend writes its provenance: in memory through model_folder, shard by shard itself
    monkeypatch.setattr(depthcut.io.model_folder, "write_json", failing)
    monkeypatch.setattr(depthcut.pipeline.prune_backends, "write_json", failing)
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    code = main(_argv(PRUNE, model=tiny_llama_dir, out=tmp_path / "pruned"))
    message = {"ENOSPC": "no space left on the disk holding", "EROFS": "read-only file system",
               "EIO": "input/output error"}[code_name]
    _assert_one_error(code, capsys.readouterr().err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"] and keep.read_text() == "mine"


def test_a_full_disk_from_a_library_that_wraps_the_os_error(tmp_path):
    with pytest.raises(DepthcutError, match="no space left"), atomic_output_dir(tmp_path / "out") as staging:
        (staging / "w.bin").write_bytes(b"x")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                           "\"No space left on device\" })")
    assert list(tmp_path.iterdir()) == []


# --- modes ---------------------------------------------------------------------------------------

def test_weights_follow_the_umask_like_every_other_file(capsys, tmp_path, tiny_llama_dir):
    previous = os.umask(0o027)
    try:
        assert main(_argv(PRUNE, model=tiny_llama_dir, out=tmp_path / "pruned")) == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "pruned").iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}, modes
    assert (tmp_path / "pruned").stat().st_mode & 0o777 == 0o750


# --- sweeps -------------------------------------------------------------------------------------

SWEEP = ["--drop", "0,1", "--strategies", "deepest", "--samples", "2", "--seq-len", "8", "--loss-samples", "2",
         "--loss-seq-len", "8", "--quiet"]


@pytest.mark.slow
def test_a_sweep_folder_follows_the_same_rules(capsys, monkeypatch, tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "sweep"
    argv = ["sweep", str(tiny_llama_dir), "--out", str(out), "--data", str(corpus_file), "--loss", str(corpus_file),
            *SWEEP]
    assert main(argv) == 0, capsys.readouterr().err
    first = (out / "results.jsonl").read_text()
    assert (out / "figures" / "loss.png").is_file()
    assert _hidden(tmp_path) == [] and _hidden(out) == [] and _hidden(out / "figures") == []

    # --force starts afresh in a new folder beside the old one, which stays until the new one is in place
    (out / "mine.txt").write_text("old run's notes")
    seen = {}
    original = atomic._publish

    def publish(staging, claim):
        if claim.out == out:
            seen["old kept"] = (out / "mine.txt").is_file() and (out / "results.jsonl").read_text() == first
        return original(staging, claim)

    monkeypatch.setattr(atomic, "_publish", publish)
    assert main([*argv, "--force"]) == 0, capsys.readouterr().err
    assert seen == {"old kept": True}
    assert not (out / "mine.txt").exists() and (out / "report.html").is_file()
    assert len(ResultsLog(out).points()) == 2
    assert _hidden(tmp_path) == [] and _hidden(out) == []


def test_a_sweep_folder_created_by_someone_else_before_the_first_point(capsys, monkeypatch, tmp_path, tiny_llama_dir,
                                                                      corpus_file):
    out = tmp_path / "sweep"
    import depthcut.pipeline.sweep

    original = depthcut.pipeline.sweep.continued_output_dir

    def appear_first(path, force=False):
        _users_folder(out)
        return original(path, force)

    monkeypatch.setattr(depthcut.pipeline.sweep, "continued_output_dir", appear_first)
    code = main(["sweep", str(tiny_llama_dir), "--out", str(out), "--data", str(corpus_file), "--loss",
                 str(corpus_file), *SWEEP])
    _assert_one_error(code, capsys.readouterr().err, "was created by something else")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and _hidden(tmp_path) == []


# --- a model folder's files: regular files inside it (issue 24) ----------------------------------

def _model_with_link(tiny_llama_dir: Path, tmp_path: Path, name: str, target: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / name).symlink_to(target)
    return model


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("a secret outside the model folder\n")
    return path


def _no_copy_of(folder: Path, secret: Path) -> None:
    """No file under `folder` holds the secret's bytes."""
    text = secret.read_bytes()
    assert all(text not in p.read_bytes() for p in folder.rglob("*") if p.is_file()), folder


@pytest.mark.parametrize("stream", [False, True])
def test_a_symlink_out_of_the_model_folder_is_not_copied(capsys, tmp_path, tiny_llama_dir, secret, stream):
    model = _model_with_link(tiny_llama_dir, tmp_path, "notes.txt", secret)
    out = tmp_path / "pruned"
    code = main(_argv(PRUNE, model=model, out=out) + (["--stream"] if stream else []))
    err = capsys.readouterr().err
    assert code == 0, err
    assert not (out / "notes.txt").exists()
    _no_copy_of(out, secret)
    if stream:  # the in-memory prune copies no extra file at all
        assert f"warning: {model / 'notes.txt'} was not copied: it is a symlink to {secret}, outside" in err


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json", "depthcut.json"])
@pytest.mark.parametrize("command", ["prune", "prune-stream", "heal"])
def test_a_file_that_is_read_and_links_out_of_the_folder_is_refused(capsys, tmp_path, tiny_llama_dir, corpus_file,
                                                                    secret, name, command):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / name).unlink(missing_ok=True)
    (model / name).symlink_to(secret)
    out = tmp_path / "out"
    argv = {"prune": _argv(PRUNE, model=model, out=out), "prune-stream": _argv(PRUNE, model=model, out=out) + ["--stream"],
            "heal": ["heal", str(model), "--data", str(corpus_file), "--out", str(out), "--steps", "1", "--quiet"]}
    code = main(argv[command])
    err = capsys.readouterr().err
    _assert_one_error(code, err, f"{model / name} is a symlink to {secret}, outside the model folder")
    assert "loading" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "secret.txt"]


@pytest.mark.parametrize("stream", [False, True])
def test_auto_map_code_that_links_out_of_the_folder_is_refused(capsys, tmp_path, tiny_llama_dir, secret, stream):
    from test_bad_input import _custom_model

    model = _custom_model(tiny_llama_dir, tmp_path / "custom", "llama")
    outside = tmp_path / "elsewhere.py"
    outside.write_text((model / "modeling_tiny.py").read_text() + "# not in the model folder\n")
    (model / "modeling_tiny.py").unlink()
    (model / "modeling_tiny.py").symlink_to(outside)
    code = main(_argv(PRUNE, model=model, out=tmp_path / "pruned") + (["--stream"] if stream else []))
    _assert_one_error(code, capsys.readouterr().err, "modeling_tiny.py is a symlink to")
    assert not (tmp_path / "pruned").exists()


def test_a_symlink_inside_the_folder_and_a_hub_cache_snapshot_are_fine(capsys, tmp_path, tiny_llama_dir):
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in tiny_llama_dir.iterdir():  # the hub cache's layout: every file a link into blobs/
        shutil.copy(file, repo / "blobs" / file.name)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / file.name)
    (snapshot / "notes.txt").write_text("notes")
    (snapshot / "NOTES").symlink_to("notes.txt")  # a link inside the folder
    for stream in ([], ["--stream"]):
        out = tmp_path / f"pruned{len(stream)}"
        code = main(_argv(PRUNE, model=snapshot, out=out) + stream)
        assert code == 0, capsys.readouterr().err
        _assert_pruned_model(out)
    assert (tmp_path / "pruned1" / "NOTES").read_text() == "notes"


def test_a_fifo_in_place_of_the_weights_is_refused_not_waited_on(capsys, tmp_path, tiny_llama_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    for stream in ([], ["--stream"]):
        code = main(_argv(PRUNE, model=model, out=tmp_path / "out") + stream)
        _assert_one_error(code, capsys.readouterr().err, f"{model / 'model.safetensors'} is not a regular file")


# --- the lock file is depthcut's own (issue 24) -----------------------------------------------------

@pytest.mark.parametrize("how, message", [("symlink", "is a symlink"), ("dangling", "is a symlink"),
                                          ("hardlink", "has other names (hard links)"),
                                          ("fifo", "is not a regular file")])
def test_a_lock_path_that_is_not_a_plain_file_is_refused_and_nothing_is_written_through_it(capsys, tmp_path,
                                                                                          tiny_llama_dir, how, message):
    users = tmp_path / "users.txt"
    users.write_text("the user's file\n")
    lock = tmp_path / ".pruned.lock"
    if how == "symlink":
        lock.symlink_to(users)
    elif how == "dangling":
        lock.symlink_to(tmp_path / "created-through-the-link")
    elif how == "hardlink":
        os.link(users, lock)
    else:
        os.mkfifo(lock)
    code = main(_argv(PRUNE, model=tiny_llama_dir, out=tmp_path / "pruned"))
    err = capsys.readouterr().err
    _assert_one_error(code, err, f"the lock file {lock} of {tmp_path / 'pruned'} {message}")
    assert "loading" not in err
    assert users.read_text() == "the user's file\n" and not (tmp_path / "created-through-the-link").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pruned.lock", "users.txt"]


# --- an --out that overlaps an input is refused, --force or not (issue 24) --------------------------

def _overlap_argv(command: str, model: Path, out: Path, corpus: Path) -> list[str]:
    return {
        "prune": _argv(PRUNE, model=model, out=out),
        "prune-stream": [*_argv(PRUNE, model=model, out=out), "--stream"],
        "heal": ["heal", str(model), "--data", str(corpus), "--out", str(out), "--steps", "1", "--quiet"],
        "analyze": ["analyze", str(model), "--data", str(corpus), "--out", str(out), "--samples", "2", "--quiet"],
        "eval": ["eval", str(model), "--loss", str(corpus), "--out", str(out), "--quiet"],
        "sweep": ["sweep", str(model), "--out", str(out), "--data", str(corpus), "--loss", str(corpus), *SWEEP],
    }[command]


@pytest.mark.parametrize("where, relation", [("same", "is"), ("inside", "lies inside"), ("parent", "contains"),
                                             ("link", "is")])
@pytest.mark.parametrize("command", ["prune", "prune-stream", "heal", "analyze", "eval", "sweep"])
def test_an_out_that_overlaps_the_model_is_refused_even_with_force(capsys, tmp_path, tiny_llama_dir, corpus_file,
                                                                   command, where, relation):
    model = tmp_path / "models" / "model"
    shutil.copytree(tiny_llama_dir, model)
    out = {"same": model, "inside": model / "out", "parent": tmp_path / "models", "link": tmp_path / "link"}[where]
    if where == "link":
        out.symlink_to(model)
    before = _snapshot_of(tmp_path)
    code = main([*_overlap_argv(command, model, out, corpus_file), "--force"])
    err = capsys.readouterr().err
    _assert_one_error(code, err, f"--out {out} {relation} the input {model}: writing it would replace or change")
    assert "loading" not in err and _snapshot_of(tmp_path) == before


def _snapshot_of(folder: Path) -> dict:
    return {p.relative_to(folder): (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def test_heal_checkpoints_that_would_land_on_the_model_are_refused(capsys, tmp_path, tiny_llama_dir, corpus_file):
    model = tmp_path / "healed-checkpoints"  # what a heal at --out healed would use for its checkpoints
    shutil.copytree(tiny_llama_dir, model)
    before = _snapshot_of(tmp_path)
    code = main(["heal", str(model), "--data", str(corpus_file), "--out", str(tmp_path / "healed"), "--steps", "1",
                 "--force", "--quiet"])
    _assert_one_error(code, capsys.readouterr().err, f"--out {model} is the input {model}")
    assert _snapshot_of(tmp_path) == before


def test_data_inside_the_out_that_force_would_replace_is_refused(capsys, tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "analysis"
    out.mkdir()
    data = out / "corpus.jsonl"
    shutil.copy(corpus_file, data)
    code = main(["analyze", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--force", "--quiet"])
    _assert_one_error(code, capsys.readouterr().err, f"--out {out} contains the input {data}")
    assert data.read_bytes() == corpus_file.read_bytes()


@pytest.mark.parametrize("out", [".", ".."])
def test_an_out_that_names_no_new_folder_is_refused(capsys, monkeypatch, tmp_path, tiny_llama_dir, out):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main(_argv(PRUNE, model=tiny_llama_dir, out=out) + ["--force"])
    _assert_one_error(code, capsys.readouterr().err, f"--out {out} names no file or folder of its own")
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_an_out_name_too_long_for_its_temporary_is_one_error(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / ("x" * 240)  # allowed itself (255 bytes), but not its temporary sibling
    code = main(_argv(PRUNE, model=tiny_llama_dir, out=out))
    _assert_one_error(code, capsys.readouterr().err, "the name is too long; depthcut writes beside it a temporary")
    assert list(tmp_path.iterdir()) == []

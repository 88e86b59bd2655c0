"""Randomly corrupted bytes in every input format depthcut reads: a safetensors header, a shard
index, a GGUF header, JSONL and parquet data, a task file, a heal checkpoint. Each run ends with
exit 0 or exactly one `depthcut: error:` line (exit 2) that says what is wrong with which file,
never a traceback nor the command line's last net for errors it does not explain; nothing outside
--out is touched, and --out is either complete or absent (no temporary or lock left beside it)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from depthcut.cli import main

SEEDS = range(12)


def corrupted(data: bytes, seed: int, head: int = 512) -> bytes:
    """`data` with a few bytes of its first `head` bytes (where headers are) replaced at random, and
    every third seed cut short as well."""
    rng = random.Random(seed)
    damaged = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        damaged[rng.randrange(min(head, len(damaged)))] = rng.randrange(256)
    if seed % 3 == 2:
        damaged = damaged[: rng.randrange(1, len(damaged))]
    return bytes(damaged)


def files_under(root: Path, outside: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` except those of `outside` (the output), with its size and mtime."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and not (p == outside or outside in p.parents)}


def run_checked(capsys, root: Path, out: Path, *argv) -> int:
    """`depthcut ARGV` must end in exit 0 or one error line, touching nothing but `out`."""
    before = files_under(root, out)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    assert "run with --debug" not in err, f"an input no check of depthcut's explains: {err}"
    if code == 2:
        assert len([line for line in err.splitlines() if line.startswith("depthcut: error:")]) == 1, err
        assert not out.exists(), f"a failed run left {out}"
    assert files_under(root, out) == before, "a file outside --out changed"
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "a temporary or lock left"
    return code


def _copy_with(source: Path, target: Path, name: str, seed: int) -> Path:
    shutil.copytree(source, target)
    (target / name).write_bytes(corrupted((target / name).read_bytes(), seed))
    return target


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_corrupted_safetensors_header(capsys, tmp_path, tiny_llama_dir, seed, stream):
    model = _copy_with(tiny_llama_dir, tmp_path / "model", "model.safetensors", seed)
    out = tmp_path / "out"
    run_checked(capsys, tmp_path, out, "prune", model, "--layers", "2", "--out", out, *(["--stream"] if stream else []))


@pytest.mark.parametrize("seed", SEEDS)
def test_a_corrupted_shard_index(capsys, tmp_path, tiny_llama_dir, seed):
    from safetensors import safe_open

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    with safe_open(model / "model.safetensors", "pt") as weights:
        index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in weights.keys()}}
    (model / "model.safetensors.index.json").write_bytes(corrupted(json.dumps(index).encode(), seed, head=4096))
    out = tmp_path / "out"
    run_checked(capsys, tmp_path, out, "prune", model, "--layers", "2", "--out", out, "--stream")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("command", ["prune", "analyze"])
def test_a_corrupted_gguf_header(capsys, tmp_path, corpus_file, seed, command):
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType
    from test_gguf import tiny_gguf

    source = tiny_gguf(tmp_path, "llama", GGMLQuantizationType.F32)
    source.write_bytes(corrupted(source.read_bytes(), seed, head=2048))
    out = tmp_path / ("out.gguf" if command == "prune" else "out")
    if command == "prune":
        run_checked(capsys, tmp_path, out, "prune", source, "--layers", "1", "--out", out)
    else:
        run_checked(capsys, tmp_path, out, "analyze", source, "--data", corpus_file, "--samples", "2", "--seq-len", "8",
                    "--quiet", "--out", out)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_corrupted_calibration_data(capsys, tmp_path, tiny_llama_dir, corpus_file, seed, kind):
    data = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        data.write_bytes(corrupted(corpus_file.read_bytes(), seed, head=4096))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [json.loads(line) for line in corpus_file.read_text().splitlines()]
        pq.write_table(pa.table({"text": [r["text"] for r in rows]}), data)
        data.write_bytes(corrupted(data.read_bytes(), seed, head=len(data.read_bytes())))
    out = tmp_path / "out"
    run_checked(capsys, tmp_path, out, "analyze", tiny_llama_dir, "--data", data, "--samples", "2", "--seq-len", "8",
                "--out", out, "--quiet")


@pytest.mark.parametrize("seed", SEEDS)
def test_a_corrupted_task_file(capsys, tmp_path, tiny_llama_dir, seed):
    from test_eval_tasks import write_task

    task = write_task(tmp_path)
    task.write_bytes(corrupted(task.read_bytes(), seed))
    out = tmp_path / "eval.json"
    run_checked(capsys, tmp_path, out, "eval", tiny_llama_dir, "--tasks", task, "--limit", "2", "--out", out)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_llama_dir, corpus_file) -> Path:
    """A heal stopped after its first checkpoint (it diverges at the second step)."""
    root = tmp_path_factory.mktemp("checkpointed")
    assert main([str(a) for a in _heal(tiny_llama_dir, corpus_file, root / "healed")]) == 2
    return root


def _heal(model, data, out) -> list:
    return ["heal", model, "--data", data, "--out", out, "--steps", "4", "--lr", "1e30", "--seq-len", "32",
            "--batch-size", "2", "--rank", "4", "--warmup-steps", "0", "--checkpoint-every", "1", "--heldout-windows",
            "2", "--quiet"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["state.pt", "recipe.json"])
def test_a_corrupted_heal_checkpoint(capsys, tmp_path, tiny_llama_dir, corpus_file, checkpointed, seed, name):
    root = tmp_path / "run"
    shutil.copytree(checkpointed, root)
    checkpoint = root / "healed-checkpoints" / "step-0000001" / name
    checkpoint.write_bytes(corrupted(checkpoint.read_bytes(), seed, head=4096))
    out = root / "healed"
    code = run_checked(capsys, root, out, *_heal(tiny_llama_dir, corpus_file, out), "--resume")
    assert code == 2  # resumed or not, --lr 1e30 diverges: one line, nothing written


# --- a GGUF whose structure lies: every command refuses it before a reader trusts it (issue 38) -----

class _Without:
    """A write plan for `depthcut.io.gguf_writer.write_pruned` that leaves out the tensors `left_out`
    and renames nothing (so the layers keep their numbers and a gap or a hole stays)."""

    def __init__(self, left_out):
        self.left_out, self.values, self.dropped = left_out, {}, []

    def rename(self, name: str) -> str | None:
        return None if self.left_out(name) else name


def _without(source: Path, target: Path, left_out) -> Path:
    from depthcut.io.gguf_files import open_gguf
    from depthcut.io.gguf_writer import write_pruned

    write_pruned(open_gguf(source), _Without(left_out), target)
    return target


def _offset_moved(source: Path, target: Path, by: int) -> Path:
    """`source` with the data offset of blk.2.ffn_down.weight moved by `by` bytes."""
    from test_gguf import _patched

    from depthcut.io.gguf_files import open_gguf

    model = open_gguf(source)
    tensor = next(t for t in model.tensors if t.name == "blk.2.ffn_down.weight")
    relative = tensor.offset - int(model.readers[0].data_offset)
    # after the name: the dimension count (u32), two dimensions (u64 each), the type (u32), the offset (u64)
    return _patched(source, target, b"blk.2.ffn_down.weight", 4 + 8 * 2 + 4, "<Q", relative + by)


def _header_count(source: Path, target: Path, at: int, value: int) -> Path:
    """`source` with the u64 at byte `at` of its header (8: the tensor count, 16: the metadata count) set."""
    import struct

    data = bytearray(source.read_bytes())
    struct.pack_into("<Q", data, at, value)
    target.write_bytes(bytes(data))
    return target


def _renamed_in_header(source: Path, target: Path, old: bytes, new: bytes) -> Path:
    data = source.read_bytes()
    assert len(old) == len(new)
    target.write_bytes(data.replace(old, new, 1))
    return target


def _metadata_patched(key: bytes, value: int):
    from test_gguf import _patched

    return lambda source, target: _patched(source, target, key, 4, "<I", value)  # after its type (u32)


# mutation -> (how it is made from a valid tiny GGUF, the refusal's words)
GGUF_MUTATIONS = {
    "block_count beyond the layers": (_metadata_patched(b"llama.block_count", 8),
                                      r"llama.block_count is 8 but layer\(s\) 6, 7 have no tensors"),
    "block_count 2^32-1": (_metadata_patched(b"llama.block_count", 2**32 - 1),
                           r"llama.block_count is 4,294,967,295 but layer\(s\) 6, 7, 8"),
    "embedding_length the tensors lack": (_metadata_patched(b"llama.embedding_length", 2**20),
                                          r"llama.embedding_length is 1,048,576 but token_embd.weight is \[96, 32\]"),
    "a tensor count of 2^40": (lambda s, t: _header_count(s, t, 8, 2**40), r"the tensor count claims 1,099,511,627,776"),
    "a metadata count of 2^40": (lambda s, t: _header_count(s, t, 16, 2**40),
                                 r"the metadata count claims 1,099,511,627,776"),
    "an offset off the alignment": (lambda s, t: _offset_moved(s, t, 1),
                                    r"'blk.2.ffn_down.weight' starts at byte .* not on the file's 32-byte alignment"),
    "an offset past the end": (lambda s, t: _offset_moved(s, t, 2**30),
                               r"tensor 'blk.2.ffn_down.weight' starts 1,07.* bytes into the data section, which "
                               r"holds"),
    "a layer missing": (lambda s, t: _without(s, t, lambda name: name.startswith("blk.3.")),
                        r"llama.block_count is 6 but layer\(s\) 3 have no tensors"),
    "a tensor missing": (lambda s, t: _without(s, t, lambda name: name == "blk.3.ffn_down.weight"),
                         r"layer 3 lacks blk.3.ffn_down.weight, which layer 0 of the same kind has"),
    "a tensor twice": (lambda s, t: _renamed_in_header(s, t, b"blk.2.ffn_down.weight", b"blk.3.ffn_down.weight"),
                       r"[Dd]uplicated tensor with name blk.3.ffn_down.weight|'blk.3.ffn_down.weight' appears twice"),
}


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType
    from test_gguf import tiny_gguf

    return tiny_gguf(tmp_path_factory.mktemp("valid"), "llama", GGMLQuantizationType.F32)


@pytest.mark.parametrize("mutation", list(GGUF_MUTATIONS))
@pytest.mark.parametrize("command", ["analyze", "analyze --stream", "prune to GGUF", "prune to a folder", "shrink"])
def test_a_gguf_whose_structure_lies_is_refused_by_every_command(capsys, tmp_path, valid_gguf, corpus_file, mutation,
                                                                 command):
    import re

    make, words = GGUF_MUTATIONS[mutation]
    source = make(valid_gguf, tmp_path / "mutated.gguf")
    out = tmp_path / ("out.gguf" if command == "prune to GGUF" else "out")
    data = ["--data", corpus_file, "--samples", "2", "--seq-len", "8", "--quiet"]
    argv = {"analyze": ["analyze", source, *data, "--out", out],
            "analyze --stream": ["analyze", source, *data, "--stream", "--out", out],
            "prune to GGUF": ["prune", source, "--layers", "1", "--out", out],
            "prune to a folder": ["prune", source, "--layers", "1", "--out", out],
            "shrink": ["shrink", source, "--drop", "1", *data, "--candidates", "1", "--repairs", "none",
                       "--out", out]}[command]
    assert run_checked(capsys, tmp_path, out, *argv) == 2
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(words, line), line

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from depthcut import DepthcutError
from depthcut.analysis.calibration import build_calibration
from depthcut.io.data import load_texts

# Only words the tiny test tokenizer knows, so that decoding gives the text back.
DOCS = [("depth pruning removes layers " * (i % 3) + "the quick brown fox jumps over the lazy dog " * (1 + i % 4)).strip() for i in range(30)]


def _write(tmp_path, kind):
    if kind == "txt":
        path = tmp_path / "docs.txt"
        path.write_text("\n\n".join(DOCS))
    elif kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    elif kind == "json":
        path = tmp_path / "docs.json"
        path.write_text(json.dumps([{"body": d} for d in DOCS]))
    else:
        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"body": DOCS}), path)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "parquet"])
def test_every_file_kind_reads_the_same_documents(tmp_path, kind):
    path = _write(tmp_path, kind)
    source = load_texts(str(path), text_field="body")
    assert source.documents == DOCS


def test_folder_reads_all_files_in_order(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second\n\nthird")
    (tmp_path / "ignored.csv").write_text("x")
    assert load_texts(str(tmp_path)).documents == ["first", "second", "third"]


def test_c4_name_uses_the_local_data_folder(shared_data):
    source = load_texts("c4")
    assert len(source.documents) == 2000 and str(shared_data) in source.description


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.jsonl", "not found"),
        (lambda p: (p / "e.jsonl").write_text("") and p / "e.jsonl" or p / "e.jsonl", "holds no text"),
        (lambda p: (p / "f.jsonl").write_text('{"body": "x"}\n') and p / "f.jsonl", "no 'text' field"),
        (lambda p: (p / "g.jsonl").write_text("{not json\n") and p / "g.jsonl", "not valid JSON"),
        (lambda p: (p / "h.csv").write_text("a,b\n") and p / "h.csv", "unsupported file type"),
        (lambda p: p, "holds no"),
    ],
)
def test_bad_data_is_explained(tmp_path, setup, message):
    with pytest.raises(DepthcutError, match=message):
        load_texts(str(setup(tmp_path)))


def test_missing_local_named_corpus(monkeypatch, tmp_path):
    monkeypatch.setenv("DEPTHCUT_DATA_DIR", str(tmp_path))
    with pytest.raises(DepthcutError, match="does not exist"):
        load_texts("c4")


def test_windows_are_full_deterministic_and_seeded(tokenizer, tmp_path):
    source = load_texts(str(_write(tmp_path, "txt")))
    first = build_calibration(tokenizer, source, 6, 16, "windows", seed=1)
    again = build_calibration(tokenizer, source, 6, 16, "windows", seed=1)
    other = build_calibration(tokenizer, source, 6, 16, "windows", seed=2)
    assert first.input_ids.shape == (6, 16) and int(first.attention_mask.sum()) == 96
    assert first.input_ids.tolist() == again.input_ids.tolist()
    assert first.input_ids.tolist() != other.input_ids.tolist()


def test_documents_are_truncated_and_right_padded(tokenizer, tmp_path):
    source = load_texts(str(_write(tmp_path, "txt")))
    calibration = build_calibration(tokenizer, source, 8, 40, "documents", seed=0, min_tokens=4)
    lengths = calibration.attention_mask.sum(dim=1).tolist()
    assert max(lengths) <= 40 and len(set(lengths)) > 1
    for row, length in zip(calibration.attention_mask.tolist(), lengths):
        assert row == [1] * length + [0] * (len(row) - length)  # padding only on the right
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    decoded = tokenizer.decode(calibration.input_ids[0, len(prefix) : lengths[0]])
    assert any(d.startswith(decoded.strip()) for d in DOCS)


def test_too_little_text_is_explained(tokenizer, tmp_path):
    source = load_texts(str(_write(tmp_path, "txt")))
    with pytest.raises(DepthcutError, match="too short"):
        build_calibration(tokenizer, source, 500, 64, "windows")
    with pytest.raises(DepthcutError, match="too short"):
        build_calibration(tokenizer, source, 10, 64, "documents", min_tokens=60)

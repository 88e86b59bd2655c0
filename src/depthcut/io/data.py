"""Reading text from the DATA argument: files, folders, Hugging Face datasets and named corpora."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from depthcut.errors import DepthcutError, OptionTypeError
from depthcut.io.text import read_jsonl, read_utf8, utf8_lines  # noqa: F401 (utf8_lines: re-exported)

DATA_DIR_ENV = "DEPTHCUT_DATA_DIR"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# The data folder when DEPTHCUT_DATA_DIR is unset: `shared/data` beside a source checkout (the parent
# of the folder holding pyproject.toml, as the Makefile has it), so that `.venv/bin/depthcut` finds
# it without `make`. An installed (not editable) package has no checkout and so no default.
CHECKOUT = Path(__file__).resolve().parents[3]
DEFAULT_DATA_DIR = CHECKOUT.parent / "shared" / "data"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

# Named corpora: a file in the local data folder (the layout of ../shared/data), else the hub.
NAMED_CORPORA = {
    "c4": ("c4/c4_validation_2k.jsonl", "hf:allenai/c4:en:validation"),
    # the validation split (the test split stays unseen, for evidence); the local copy is the tokenized variant
    "wikitext": ("wikitext-2/valid.txt", "hf:Salesforce/wikitext:wikitext-2-v1:validation"),
}


@dataclass
class TextSource:
    """Documents to draw samples from, and a description of where they came from."""

    description: str
    documents: list[str] | None = None  # local data, all in memory
    stream: object | None = None  # a streaming Hugging Face dataset
    text_field: str = "text"

    def iter_shuffled(self, seed: int) -> Iterator[str]:
        """Documents in a seeded random order (a shuffle buffer for streamed data)."""
        if self.documents is not None:
            order = list(range(len(self.documents)))
            random.Random(seed).shuffle(order)
            for index in order:
                yield self.documents[index]
            return
        for row in self.stream.shuffle(seed=seed, buffer_size=10_000):
            text = row.get(self.text_field)
            if isinstance(text, str) and text.strip():
                yield text


def _read_txt(path: Path) -> list[str]:
    # A plain text file holds documents separated by blank lines.
    text = read_utf8(path)
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def _pick_field(row: dict, field: str, path: Path, line: int) -> str | None:
    if not isinstance(row, dict):
        raise DepthcutError(f"{path}: record {line} is not an object with a {field!r} field")
    if field not in row:
        raise DepthcutError(
            f"{path}: record {line} has no {field!r} field (fields: {', '.join(map(str, row))}); "
            f"choose one with --text-field"
        )
    value = row[field]
    return value if isinstance(value, str) and value.strip() else None


def _read_jsonl(path: Path, field: str, text: str | None = None) -> list[str]:
    rows, lines = read_jsonl(path, text)
    return [t for row, line in zip(rows, lines) if (t := _pick_field(row, field, path, line))]


def _read_json(path: Path, field: str) -> list[str]:
    text = read_utf8(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, field, text)  # JSON Lines saved with a .json suffix
    if isinstance(data, dict):
        data = data.get("data", data.get("rows", [data]))
    if not isinstance(data, list):
        raise DepthcutError(f"{path}: expected a list of records with a {field!r} field")
    return [t for i, row in enumerate(data, 1) if (t := _pick_field(row, field, path, i))]


def read_parquet_table(path: Path):
    """The pyarrow table of `path`, or one clear error for a file that is not (readable) parquet."""
    # deferred: pyarrow is needed only for parquet data
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, ValueError, OSError) as error:  # ArrowInvalid: not parquet, or a damaged file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DepthcutError(f"{path} is not a readable parquet file ({reason})") from None


def read_parquet_records(path: Path) -> list[dict]:
    return _as_python(path, read_parquet_table(path))


def _read_parquet(path: Path, field: str) -> list[str]:
    table = read_parquet_table(path)
    if field not in table.column_names:
        raise DepthcutError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)}); use --text-field")
    return [t for t in _as_python(path, table.column(field)) if isinstance(t, str) and t.strip()]


def _as_python(path: Path, values) -> list:
    """A parquet table or column as Python values: its strings are decoded only here, so bytes that
    are not UTF-8 in a string column (a damaged file) surface here, as one error."""
    try:
        return values.to_pylist()
    except UnicodeDecodeError as error:
        raise DepthcutError(f"{path}: a string column holds bytes that are not UTF-8 text (byte "
                            f"{error.object[error.start]:#04x}); is the file damaged?") from None


def _read_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return _read_txt(path)
        if suffix == ".jsonl":
            return _read_jsonl(path, field)
        if suffix == ".json":
            return _read_json(path, field)
        if suffix == ".parquet":
            return _read_parquet(path, field)
    except OSError as error:
        raise DepthcutError(f"cannot read {path}: {error.strerror or error}") from None
    raise DepthcutError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(TEXT_SUFFIXES)}")


def _hf_source(spec: str, field: str) -> TextSource:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise DepthcutError(f"malformed dataset {spec!r}; use hf:NAME[:CONFIG][:SPLIT]")
    name, config, split = parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    try:
        # deferred: datasets takes seconds to import; only Hugging Face datasets need it
        import datasets

        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as error:  # the hub raises many kinds; all mean "cannot get it"
        raise DepthcutError(f"cannot open Hugging Face dataset {spec!r}: {str(error).splitlines()[0]}") from None
    return TextSource(description=spec, stream=stream, text_field=field)


def data_dir() -> Path | None:
    """The local data folder: $DEPTHCUT_DATA_DIR; unset, `shared/data` beside the source checkout where
    there is one (DEFAULT_DATA_DIR); set but empty, none."""
    value = os.environ.get(DATA_DIR_ENV)
    if value is not None:
        return Path(value).expanduser() if value else None
    return default_data_dir()


def default_data_dir() -> Path | None:
    """DEFAULT_DATA_DIR where this package runs from a source checkout that has it beside it."""
    if (CHECKOUT / "pyproject.toml").is_file() and DEFAULT_DATA_DIR.is_dir():
        return DEFAULT_DATA_DIR
    return None


def hub_offline() -> str | None:
    """The variable that tells the Hugging Face libraries not to reach the hub (HF_HUB_OFFLINE=1 and
    the like), where one does."""
    return next((name for name in OFFLINE_VARIABLES
                 if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")), None)


def _looked_in() -> str:
    """Where a named corpus was looked for when $DEPTHCUT_DATA_DIR names no folder."""
    if os.environ.get(DATA_DIR_ENV) is not None:
        return f"{DATA_DIR_ENV} is set empty: no data folder"
    return f"{DATA_DIR_ENV} is not set; looked in {DEFAULT_DATA_DIR}"


def named_corpus_location(spec: str) -> str:
    """Where the named corpus `spec` is read from: its file in the data folder, else its hub dataset.
    Fails, without reading anything, where neither can serve: $DEPTHCUT_DATA_DIR names a folder
    without it, or there is no local copy and the hub is off (HF_HUB_OFFLINE)."""
    local, remote = NAMED_CORPORA[spec]
    folder = data_dir()
    path = folder / local if folder is not None else None
    if path is not None and path.is_file():
        return str(path)
    if os.environ.get(DATA_DIR_ENV):
        raise DepthcutError(f"{DATA_DIR_ENV} is {folder}, but {path} does not exist")
    offline = hub_offline()
    if offline:
        raise DepthcutError(f"{spec}: no local copy ({_looked_in()}); set {DATA_DIR_ENV} to a folder with {local}, "
                            f"or go online for {remote} ({offline} is set)")
    return remote


def check_data_exists(spec: str) -> None:
    """The cheap half of `load_texts`: a DATA that names no file, folder, dataset or reachable named
    corpus fails here, in milliseconds, without reading it (checked before a model loads)."""
    if spec in NAMED_CORPORA:
        named_corpus_location(spec)
    elif not spec.startswith("hf:") and not Path(spec).expanduser().exists():
        raise DepthcutError(_not_found(spec))


def _not_found(spec: str) -> str:
    names = ", ".join(NAMED_CORPORA)
    return f"data {spec!r} not found: not a file, a folder, hf:NAME or a named corpus ({names})"


def load_texts(spec: str, text_field: str = "text") -> TextSource:
    """Open DATA: a file, a folder of files, `hf:NAME[:CONFIG][:SPLIT]`, or a named corpus such as `c4`."""
    if not isinstance(spec, (str, os.PathLike)):
        raise OptionTypeError(f"load_texts: data expects a path, hf:NAME or a corpus name such as c4, got {spec!r} "
                              f"({type(spec).__name__})")
    spec = os.fspath(spec)
    if spec in NAMED_CORPORA:
        location = named_corpus_location(spec)
        if location.startswith("hf:"):
            local = NAMED_CORPORA[spec][0]
            try:
                return _hf_source(location, text_field)
            except DepthcutError as error:  # say what would have spared the hub
                raise DepthcutError(f"{error}; no local copy of {spec} ({_looked_in()}): set {DATA_DIR_ENV} to a "
                                    f"folder with {local}") from None
        source = load_texts(location, text_field)
        source.description = f"{spec} ({location})"
        return source
    if spec.startswith("hf:"):
        return _hf_source(spec, text_field)

    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DepthcutError(f"folder {spec} holds no {', '.join(TEXT_SUFFIXES)} files")
        documents = [text for file in files for text in _read_file(file, text_field)]
    elif path.is_file():
        documents = _read_file(path, text_field)
    else:
        raise DepthcutError(_not_found(spec))
    if not documents:
        raise DepthcutError(f"data {spec!r} holds no text")
    return TextSource(description=str(path), documents=documents, text_field=text_field)


def split_documents(source: TextSource, fraction: float, seed: int) -> tuple[TextSource, TextSource]:
    """A seeded split into (training, held-out) documents: training never sees the held-out ones."""
    if source.documents is None:
        raise DepthcutError("splitting off held-out text needs local data (a file, folder or c4 sample), not a streamed dataset")
    order = list(range(len(source.documents)))
    random.Random(seed).shuffle(order)
    count = max(1, round(len(order) * fraction))
    if len(order) - count < 1:
        raise DepthcutError(f"data {source.description!r} has {len(order)} documents: too few to hold some out")
    held = [source.documents[i] for i in sorted(order[:count])]
    train = [source.documents[i] for i in sorted(order[count:])]
    return (TextSource(f"{source.description} (training)", train), TextSource(f"{source.description} (held out)", held))


def local_corpus(name: str) -> Path | None:
    """The local copy of a named corpus in the data folder, where there is one (no hub is asked)."""
    folder = data_dir()
    if name not in NAMED_CORPORA or folder is None:
        return None
    path = folder / NAMED_CORPORA[name][0]
    return path if path.is_file() else None


def second_domain(primary: str) -> str | None:
    """A named corpus of another domain than `primary` with a local copy (WikiText-2 beside C4), to judge a
    cut on text unlike its calibration text; None where the data folder has none."""
    other = "c4" if primary == "wikitext" else "wikitext"
    return other if local_corpus(other) is not None else None

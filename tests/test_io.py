"""depthcut.io.safetensors against the safetensors library itself, dtype by dtype, and on corrupt files.

Every dtype of the safetensors format that `safetensors.torch` maps to a torch dtype is covered
(`DTYPES`). Not covered: F8_E8M0, F4, F6_E2M3 and F6_E3M2, which the format names but
`safetensors.torch` reads into no torch dtype (so neither side of a round trip exists for them).
"""

import dataclasses
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from depthcut.errors import DepthcutError
from depthcut.io.safetensors import (
    DTYPES,
    copied_entry,
    dtype_name,
    read_tensor,
    safetensors_header,
    tensor_entry,
    write_safetensors,
)

METADATA = {"format": "pt", "note": "made by the depthcut tests"}
# torch.equal has no CPU kernel for the 8-bit floats: those are compared bit for bit.
_BITWISE = {torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz}


def _values(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 4).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=generator).to(dtype)


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A matrix, an empty tensor, a 0-d scalar and a non-contiguous view, all of `dtype`."""
    return {"matrix": _values(dtype, (3, 5)), "empty": _values(dtype, (0, 4)), "scalar": _values(dtype, (), seed=1),
            "transposed": _values(dtype, (4, 2), seed=2).t()}


def _assert_same(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, name
    if expected.dtype in _BITWISE:
        got, expected = got.view(torch.uint8), expected.view(torch.uint8)
    assert torch.equal(got, expected), name


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_our_writer_is_read_by_safetensors(tmp_path, name):
    dtype = DTYPES[name]
    assert dtype_name(dtype) == name
    tensors = _tensors(dtype)
    path = tmp_path / "ours.safetensors"
    size = write_safetensors(path, [tensor_entry(key, tensor) for key, tensor in tensors.items()], METADATA)
    assert size == sum(t.numel() * t.element_size() for t in tensors.values())
    with safe_open(path, framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(tensors) and handle.metadata() == METADATA
        for key, tensor in tensors.items():
            _assert_same(handle.get_tensor(key), tensor, key)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_safetensors_files_are_read_by_our_reader(tmp_path, name):
    tensors = {key: tensor.contiguous() for key, tensor in _tensors(DTYPES[name]).items()}
    path = tmp_path / "theirs.safetensors"
    save_file(tensors, path, metadata=METADATA)
    header, _ = safetensors_header(path)
    assert header["__metadata__"] == METADATA
    for key, tensor in tensors.items():
        _assert_same(read_tensor(path, key), tensor, key)
        assert header[key]["dtype"] == name


def test_copied_and_in_memory_tensors_in_one_file(tmp_path):
    """Byte ranges copied from another file (renamed) and tensors in memory, in the order given."""
    source = tmp_path / "source.safetensors"
    originals = {"a": _values(torch.bfloat16, (7, 3)), "b": _values(torch.int8, (5,)), "c": _values(torch.bool, (2, 2))}
    save_file(originals, source)
    fresh = _values(torch.float32, (2, 6), seed=3)
    path = tmp_path / "mixed.safetensors"
    write_safetensors(path, [copied_entry("renamed.b", source, "b"), tensor_entry("fresh", fresh),
                             copied_entry("renamed.a", source, "a"), copied_entry("renamed.c", source, "c")])
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}  # the default, which transformers expects
        for key in "abc":
            _assert_same(handle.get_tensor(f"renamed.{key}"), originals[key], key)
        _assert_same(handle.get_tensor("fresh"), fresh, "fresh")
    header, start = safetensors_header(path)
    assert start % 8 == 0  # the data section starts aligned
    assert [header[k]["data_offsets"][0] for k in ("renamed.b", "fresh", "renamed.a", "renamed.c")] == [0, 5, 53, 95]


def test_an_entry_that_does_not_match_its_tensor_is_refused(tmp_path):
    entry = tensor_entry("x", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="the entry says F16"):
        write_safetensors(tmp_path / "x.safetensors", [dataclasses.replace(entry, dtype="F16")])
    with pytest.raises(ValueError, match="two tensors are named 'x'"):
        write_safetensors(tmp_path / "x.safetensors", [entry, entry])
    with pytest.raises(DepthcutError, match="safetensors cannot store"):
        tensor_entry("q", torch.zeros(2, dtype=torch.complex128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_a_tensor_read_into_pinned_memory(tmp_path):
    path = tmp_path / "x.safetensors"
    tensor = _values(torch.bfloat16, (64, 8))
    save_file({"x": tensor}, path)
    got = read_tensor(path, "x", pin=True)
    assert got.is_pinned()
    _assert_same(got, tensor, "x")


# --- corrupt files --------------------------------------------------------------------------------

def _raw_file(path, header: dict, data: bytes, length: int | None = None):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
    return path


def _refused(path, message: str) -> None:
    with pytest.raises(DepthcutError, match=message) as error:
        safetensors_header(path)
    assert str(error.value).startswith(f"{path} is not a valid safetensors file: ")
    with pytest.raises(DepthcutError, match=message):
        read_tensor(path, "a")


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(8)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    _refused(path, r"ends 10 bytes past the end of the file \(truncated\?\)")


def test_a_header_length_beyond_the_file_is_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    _refused(_raw_file(tmp_path / "x.safetensors", header, b"\0" * 4, length=10**6),
             "the header length is beyond the end of the file")


def test_overlapping_tensors_are_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    _refused(_raw_file(tmp_path / "x.safetensors", header, b"\0" * 12), "the bytes of tensors 'a' and 'b' overlap")


@pytest.mark.parametrize(("header", "data", "message"), [
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "has 8 bytes, its shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "entry of tensor 'a' is malformed"),
    ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8, "entry of tensor 'a' is malformed"),
    ([1, 2], b"", "the header is not a JSON object"),
])
def test_malformed_headers_are_refused(tmp_path, header, data, message):
    _refused(_raw_file(tmp_path / "x.safetensors", header, data), message)


def test_a_file_too_short_or_not_json_is_refused(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2\3")
    _refused(short, "3 bytes, too short for a header")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff{x}")
    _refused(garbage, "the header is not valid JSON")

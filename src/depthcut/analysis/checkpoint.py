"""Reading a checkpoint one tensor at a time, for the layer-streamed passes (`depthcut.analysis.streamed`,
`depthcut.repair.streamed`): whether a model would fit in memory, the model without weights and a
reader of its tensors (safetensors shards or a GGUF file), and one module's tensors read, cast and
assigned.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from depthcut.analysis.gguf_checkpoint import GGUFCheckpointReader, gguf_skeleton
from depthcut.errors import DepthcutError
from depthcut.io.finite import check_finite_tensors
from depthcut.io.safetensors import own_memory, read_tensor
from depthcut.model.shards import INDEX_FILE, SINGLE_FILE, model_names, shard_map
from depthcut.model.skeleton import checkpoint_dtype, meta_skeleton


def is_safetensors_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and (
        (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file()
    )


def checkpoint_bytes(folder: str | Path) -> int:
    """The size of the checkpoint's tensors, from the shard files."""
    folder = Path(folder)
    return sum((folder / shard).stat().st_size for shard in set(shard_map(folder).values()))


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory of `device` (CUDA) or available RAM (Linux `MemAvailable`); None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def would_not_fit(folder: str | Path, dtype: torch.dtype | None, device: torch.device,
                  headroom: float = 0.9) -> str | None:
    """Why the model in `folder` should be streamed (its weights in `dtype` take more than
    `headroom` of the memory available on `device`), or None."""

    size = checkpoint_bytes(folder)
    saved = checkpoint_dtype(json.loads((Path(folder) / "config.json").read_text()))
    if dtype is not None and saved is not None:
        size = size * dtype.itemsize // saved.itemsize
    available = available_memory_bytes(device)
    if available is None or size <= headroom * available:
        return None
    return f"the weights take {size / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is available on {device}"


class CheckpointReader:
    """Tensors by name from a folder of safetensors shards, one tensor read at a time, by plain file
    reads (`depthcut.io.safetensors.read_tensor`), never through a memory map."""

    def __init__(self, folder: str | Path, model):
        self.folder = Path(folder)
        self.weight_map = shard_map(self.folder)
        names, self.converted = model_names(self.weight_map, model)
        self.keys = {name: key for key, name in names.items() if key not in self.converted}

    def key_for(self, name: str) -> str | None:
        """The checkpoint's name of the model parameter `name`."""
        return self.keys.get(name)

    def get(self, key: str, pin: bool = False) -> torch.Tensor:
        """The tensor `key`, read into memory of its own (see `own_memory`), or page-locked memory
        with `pin` (for asynchronous copies to a GPU); refused if not finite (no layer is run, no
        repair fitted, on a NaN weight)."""
        path = self.folder / self.weight_map[key]
        tensor = read_tensor(path, key, pin=pin)
        check_finite_tensors([(key, tensor)], str(path))
        return tensor


def open_checkpoint(folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | None = None,
                    trust_remote_code: bool = False):
    """(the model without weights, its dtype, a reader of its tensors one at a time) for a folder of
    safetensors shards or a .gguf file (whose tensors are dequantized as they are read)."""
    if str(folder).lower().endswith(".gguf"):
        model, _, dtype = gguf_skeleton(folder, dtype, device, trust_remote_code)
        return model, dtype, GGUFCheckpointReader(folder, model)
    model, _, dtype = meta_skeleton(folder, dtype, device, trust_remote_code)
    return model, dtype, CheckpointReader(folder, model)


def read_parameters(names: dict[str, str], reader: CheckpointReader, dtype: torch.dtype | None,
                     device: torch.device, stream=None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors `names` (parameter name -> checkpoint key) in `dtype` on `device`.

    For a CUDA device they are read into pinned memory and copied on `stream` (a stream of the
    caller's thread's own, so the copies overlap the compute on the default stream); this thread
    waits for the copies, so the caller may use the tensors at once.
    """
    state = {}
    cuda = device.type == "cuda"
    for name, key in names.items():
        tensor = reader.get(key, pin=cuda)
        convert = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
        if cuda:
            with torch.cuda.stream(stream):  # converted where it is cheapest: on the GPU
                tensor = tensor.to(device, non_blocking=True)
                tensor = tensor.to(dtype) if convert else tensor
        elif convert and device.type == "cpu":  # into memory of its own too
            tensor = own_memory(tensor.numel() * dtype.itemsize).view(dtype).reshape(tensor.shape).copy_(tensor)
        else:
            tensor = (tensor.to(dtype) if convert else tensor).to(device)
        state[name] = tensor
    if cuda:
        stream.synchronize()  # waited for here, in the reader's thread: the caller can use the tensors at once
    return state


def assign_parameters(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Give `module` the tensors `state` (from `read_parameters`); returns their bytes."""
    for tensor in state.values():
        if tensor.device.type == "cuda":  # made on the reader's stream, used and freed on this one
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
    module.load_state_dict(state, strict=False, assign=True)
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def load_parameters(module: torch.nn.Module, names: dict[str, str], reader: CheckpointReader,
                     dtype: torch.dtype | None, device: torch.device) -> int:
    """Give `module` the checkpoint tensors `names` (parameter name in module -> checkpoint key); returns bytes."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    return assign_parameters(module, read_parameters(names, reader, dtype, device, stream))


def parameter_keys(module: torch.nn.Module, path: str, reader: CheckpointReader,
                    skip: set[int] = frozenset()) -> dict[str, str]:
    keys, missing = {}, []
    for name, param in module.named_parameters():
        if id(param) in skip:
            continue
        key = reader.key_for(f"{path}.{name}" if path else name)
        if key is None:
            missing.append(f"{path}.{name}" if path else name)
        else:
            keys[name] = key
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        why = (" (its weights are converted on load, e.g. fused experts, which streaming does not do)"
               if reader.converted else "")
        raise DepthcutError(f"the checkpoint in {reader.folder} has no tensor for {shown}{why}")
    return keys

"""Several processes (`accelerate launch`, `torchrun`): which one this is, and sums across them.

The process group is accelerate's (`PartialState`). A single plain process never forms one, and
nothing here imports accelerate for it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import torch

from depthcut.errors import DepthcutError

# What launchers set: torchrun and accelerate launch the first of each, MPI launchers the others.
_RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _from_environment(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def launched_as_several() -> bool:
    """Whether a launcher started this process as one of several (read from its environment)."""
    return _from_environment(_SIZE_VARIABLES, 1) > 1


def _formed_state():
    """accelerate's state of this process if something (an `Accelerator`, `process_state`) made it."""
    module = sys.modules.get("accelerate.state")
    if module is None or not module.PartialState._shared_state:
        return None
    return module.PartialState()


def is_main_process() -> bool:
    """Whether this process writes the outputs: the only one, or the first of several.

    Cheap, and forms no process group: until one is formed, the launcher's environment answers.
    """
    state = _formed_state()
    if state is not None:
        return state.is_main_process
    return _from_environment(_RANK_VARIABLES, 0) == 0


def process_state(device: torch.device | str):
    """accelerate's `PartialState` of this process, forming the process group when launched as
    several: gloo for a model on the CPU, the accelerator's own backend (nccl, ...) otherwise.
    A group that cannot form raises `DepthcutError`, and the next call tries again."""
    # deferred: accelerate is imported only where processes or empty weights need it
    from accelerate import PartialState

    cpu = torch.device(device).type == "cpu"
    try:
        return PartialState(cpu=cpu, **({"backend": "gloo"} if cpu and launched_as_several() else {}))
    except (RuntimeError, ValueError) as error:
        PartialState._reset_state()  # a half-made state would answer every later call
        raise DepthcutError(f"the process group did not form ({str(error).splitlines()[0]})") from None


def rank_and_world(device: torch.device | str) -> tuple[int, int]:
    """(process index, number of processes); (0, 1) for a plain process, without touching accelerate."""
    if not launched_as_several():
        return 0, 1
    state = process_state(device)
    return state.process_index, state.num_processes


def sum_across_processes(tensors: Iterable[torch.Tensor]) -> None:
    """Replace every tensor, in place, by its sum over all processes: one all-reduce in the tensor's
    own dtype (float64 accumulators stay float64), on the device the process group communicates from."""
    # deferred: accelerate is imported only where processes or empty weights need it
    from accelerate import PartialState
    from accelerate.utils import reduce

    state = PartialState()
    for tensor in tensors:
        tensor.copy_(reduce(tensor.to(state.device), reduction="sum").to(tensor.device))

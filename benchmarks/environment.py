"""Where a benchmark ran: one record, stored beside every benchmark's figures.

A ratio means little without the machine it came from: bf16 is 2x faster than float32 on a CPU
with AVX512-BF16 and 5x slower on an AVX2-only one, and a GPU run is another world again. So every
benchmark stores `record(...)`: the processor (ATen's CPU capability and the bf16 flags), the cores
and threads, the GPU (name, memory, compute capability, CUDA) when the device is one, the versions
of the libraries that do the work, the dtype, and the load average.

Importing this module imports nothing heavy; torch is imported when `record` is called, so a
parent process that must stay small (its children's ru_maxrss starts from its peak) can import it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
from pathlib import Path

# The libraries whose versions are recorded (distribution name: import name), where installed.
PACKAGES = {
    "torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
    "safetensors": "safetensors", "tokenizers": "tokenizers", "bitsandbytes": "bitsandbytes",
    "lm_eval": "lm_eval", "datasets": "datasets", "numpy": "numpy",
}


def package_version(distribution: str, module: str | None = None) -> str | None:
    """The installed version of `distribution`, else its module's __version__, else None.

    Only the metadata is read when there is some: importing bitsandbytes or lm_eval to learn their
    version would cost seconds and load CUDA libraries.
    """
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(module or distribution), "__version__", None)
    except Exception:  # noqa: BLE001 - absent or broken: either way there is no version to record
        return None


def cpu_facts() -> dict:
    """The processor: model name, ATen's vector capability, the bf16 instructions it has, the cores."""
    import torch

    flags, model = set(), None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "threads": torch.get_num_threads(),
    }


def gpu_facts(device) -> dict:
    """The GPU that `device` names: name, memory, compute capability, CUDA and cuDNN, TF32 settings."""
    import torch

    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return {
        "gpu": properties.name,
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
        "gpu_capability": f"{properties.major}.{properties.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def record(device=None, dtype=None, **extra) -> dict:
    """Where this process runs: processor, GPU (when `device` is a CUDA device), versions, dtype.

    `device` and `dtype` are what the benchmark ran with ("auto" is resolved by the caller, or
    recorded as such); `extra` adds the benchmark's own facts (threads asked for, ...).
    """
    import torch

    facts: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{name: package_version(name, module) for name, module in PACKAGES.items()},
        "depthcut": package_version("depthcut"),
        **cpu_facts(),
        "device": str(device) if device is not None else None,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "load_average": os.getloadavg(),
    }
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        facts.update(gpu_facts(device))
    facts.update(extra)
    return facts


def save(figures: dict, out, environment: dict) -> None:
    """Print where `figures` were measured and write them, with that record, as JSON to `out`."""
    import json

    print(describe(environment))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**figures, "environment": environment}, indent=1, default=str))


def describe(facts: dict) -> str:
    """One line for a benchmark's printout: where the figures above come from."""
    if facts.get("gpu"):
        where = f"{facts['gpu']} ({facts['gpu_memory_gib']} GiB, CUDA {facts['cuda']})"
    else:
        where = f"{facts['cpu']} ({', '.join([facts['cpu_capability'], *facts['cpu_bf16']])})"
    dtype = f"{facts['dtype']}; " if facts.get("dtype") else ""
    return (f"ran on {where}; {facts['cpu_usable']} cores, {facts['threads']} threads; {dtype}"
            f"torch {facts['torch']}, transformers {facts['transformers']}, peft {facts['peft']}")


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Print where this machine would run a benchmark, as JSON.")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    facts = record(args.device, args.dtype)
    print(json.dumps(facts, indent=1))
    print(describe(facts))

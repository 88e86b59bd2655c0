"""Loading a MODEL argument (folder, hub id, .gguf file, built-in name; resolved by `depthcut.model.source`)
to a model and tokenizer."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
import transformers.modeling_gguf_pytorch_utils as gguf_utils
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from depthcut.errors import DepthcutError
from depthcut.io.config_checks import check_config_against_weights, config_failure
from depthcut.io.gguf_files import open_gguf
from depthcut.io.model_files import read_model_text
from depthcut.io.safetensors import safetensors_header
from depthcut.model.layers import text_config
from depthcut.model.precision import announce, choose_dtype
from depthcut.model.source import BUILTIN_MODELS, ModelSource, resolve_model  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def checkpoint_dtype(source: ModelSource) -> torch.dtype | None:
    """The dtype a local folder's config says its weights are stored in (None when unknown or GGUF)."""

    config = Path(source.location) / "config.json"
    if source.gguf_file or not config.is_file():
        return None
    try:
        facts = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = facts.get("dtype") or facts.get("torch_dtype") or (facts.get("text_config") or {}).get("dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """The torch dtype of a --dtype value on `device` (`None`: keep the checkpoint's); see depthcut.model.precision."""
    return choose_dtype(name, device).dtype


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


try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors
    from safetensors._safetensors_rust import SafetensorError
from huggingface_hub.errors import StrictDataclassError  # a config field of the wrong type


def check_weights(source: ModelSource) -> None:
    """Read the header of every safetensors file of a local model folder, so that a truncated or
    corrupt file is named before loading starts (reading a header costs a few kilobytes), and its
    config.json against them (`depthcut.io.config_checks`: an absurd layer count is refused before
    transformers builds the model); a GGUF file
    gets the checks every GGUF path shares (`depthcut.io.gguf_files.open_gguf`: counts bounded by the
    file, tensors aligned and apart, every layer whole) before transformers reads it."""

    folder = Path(source.location)
    if source.gguf_file:
        open_gguf(folder / source.gguf_file)
        return
    if not folder.is_dir():
        return
    for shard in sorted(folder.glob("*.safetensors")):
        safetensors_header(shard)
    check_config_against_weights(folder)
    generation = folder / "generation_config.json"
    if generation.is_file():  # transformers passes over one that is not JSON, but not one that is a list
        try:
            facts = json.loads(read_model_text(folder, generation.name))
        except ValueError:
            facts = {}
        if not isinstance(facts, dict):
            raise DepthcutError(f"{generation} holds a JSON {type(facts).__name__}, not the object of a generation "
                                "config")


# the JSON files of a tokenizer that transformers reads from a model folder
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_tokenizer_files(source: ModelSource) -> None:
    """The tokenizer's JSON files of a local folder must be UTF-8 JSON objects, checked before the
    model loads: a truncated tokenizer.json failed only after it, with a JSON parser's message that
    named no file."""
    folder = Path(source.location)
    if source.gguf_file or not folder.is_dir():
        return
    for name in TOKENIZER_JSON:
        if (folder / name).is_file():
            try:
                facts = json.loads(read_model_text(folder, name))
            except UnicodeDecodeError as error:
                raise DepthcutError(f"{folder / name} is not UTF-8 text (byte {error.start}): the tokenizer "
                                    "cannot be read") from None
            except ValueError as error:
                raise DepthcutError(f"{folder / name} is not valid JSON ({error}; truncated?): the tokenizer "
                                    "cannot be read") from None
            if not isinstance(facts, dict):
                raise DepthcutError(f"{folder / name} holds a JSON {type(facts).__name__}, not an object: the "
                                    "tokenizer cannot be read")


def load_tokenizer(spec: str, source: ModelSource, **kwargs):
    """The tokenizer of a loaded model's source, or one line naming what it was read from."""
    try:
        return AutoTokenizer.from_pretrained(source.location, **kwargs)
    except Exception as error:  # the tokenizers library raises plain Exceptions for a bad file
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[0].rstrip(":") if lines else type(error).__name__
        folder = Path(source.location)
        if source.gguf_file:
            read = f"the tokenizer in {folder / source.gguf_file}'s metadata"
            if isinstance(error, KeyError) and error.args:  # a tokenizer.ggml.* key transformers needs
                reason = f"it has no tokenizer.ggml.{error.args[0]}"
        elif (folder / "tokenizer.json").is_file():
            read = str(folder / "tokenizer.json")
            if isinstance(error, KeyError) and error.args:
                reason = f"it lacks the field {error.args[0]!r}"
        elif folder.is_dir():
            read = f"{folder}, which has no tokenizer.json"
        else:
            read = f"{spec}'s tokenizer"
        raise DepthcutError(f"could not load the tokenizer of model {spec!r} from {read}: {reason}") from error


def checked_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer of MODEL `spec` alone (what a pass that streams the weights needs), after the
    checks a load runs first (a GGUF's structure, the config against the weights, the tokenizer's
    JSON files); a failure names what it read."""
    source = resolve_model(spec)
    check_weights(source)
    check_tokenizer_files(source)
    gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return load_tokenizer(spec, source, trust_remote_code=trust_remote_code, **gguf)


def _load_failure(error: Exception, source: ModelSource) -> str:
    """One line saying why loading failed (transformers' first line, with what to do where it omits it,
    and for a local folder's config, the file and field)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, (KeyError, StrictDataclassError)) and not source.gguf_file and \
            Path(source.location).is_dir():
        return config_failure(source.location, error)
    if "custom code" in message and "trust_remote_code" not in message:
        message = message.rstrip(". ") + ": pass --trust-remote-code to run it (only for code you trust)"
    if isinstance(error, SafetensorError):
        message = f"corrupt or truncated safetensors weights ({message})"
    return message


def _check_loading_report(spec: str, report: dict) -> None:
    """Weights that the config has no place for, or places that no weight fills (transformers would
    fill them with random numbers), mean the config does not describe the checkpoint: e.g. its
    num_hidden_layers disagrees with the layers stored."""
    problems = [f"{len(report[key])} {what} (e.g. {min(report[key])})"
                for key, what in (("missing_keys", "weights missing"), ("unexpected_keys", "weights unexpected"))
                if report.get(key)]
    if problems:
        raise DepthcutError(f"could not load model {spec!r}: its weights do not match its config.json: "
                            f"{'; '.join(problems)}; does num_hidden_layers agree with the layers stored?")


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

    `dtype` is "auto" (what the device computes natively, see `depthcut.model.precision`), "checkpoint",
    or a dtype name; the choice and its reason are in `source.dtype`.
    `quantize="4bit"` loads the weights as 4-bit NF4 with bitsandbytes (QLoRA's frozen base), on CUDA
    or on CPU (bitsandbytes >= 0.46 has CPU kernels; there it saves memory, not time).
    `device_map` ("auto", "balanced", a dict) spreads the layers over several GPUs with accelerate
    (then `device` is not used); inputs go to the device of the embeddings.
    """

    source = resolve_model(spec)
    target = resolve_device(device)
    if device_map is not None and target.type == "cpu" and torch.cuda.is_available():
        target = torch.device("cuda")  # the dtype is chosen for the GPUs the map spreads over
    choice = choose_dtype(dtype, target, checkpoint_dtype(source))
    source.dtype = choice
    torch_dtype = choice.dtype
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["use_safetensors"] = True
    if quantize == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype or torch.float32,
        )
        kwargs["device_map"] = {"": target.index or 0} if target.type == "cuda" else {"": str(target)}
    if device_map is not None:
        if source.gguf_file:
            raise DepthcutError("--device-map needs a safetensors model, not a GGUF file")
        kwargs["device_map"] = device_map
    check_weights(source)
    if with_tokenizer:
        check_tokenizer_files(source)
    try:
        model, report = AutoModelForCausalLM.from_pretrained(
            source.location, dtype=torch_dtype if torch_dtype and not source.gguf_file else "auto",
            output_loading_info=True, **kwargs
            # GGUF dequantizes to float32; the cast to the asked dtype happens after loading.
        )
        _check_loading_report(spec, report)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, SafetensorError, StrictDataclassError) as error:
        raise DepthcutError(f"could not load model {spec!r}: {_load_failure(error, source)}") from error
    # Only what the tokenizer understands: the model's own arguments (a quantization config, a
    # device map) would be kept in its init kwargs and break `tokenizer.save_pretrained`.
    tokenizer_kwargs = {k: kwargs[k] for k in ("trust_remote_code", "gguf_file") if k in kwargs}
    tokenizer = load_tokenizer(spec, source, **tokenizer_kwargs) if with_tokenizer else None
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


def quiet_model_loading() -> None:
    """No progress bars while transformers loads or converts a model."""

    hf_logging.disable_progress_bar()
    try:  # the GGUF converter's bar is a plain tqdm that the switch above does not reach


        if not isinstance(gguf_utils.tqdm, functools.partial):
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    except (ImportError, AttributeError):
        pass


def load_model_announced(spec: str, *, quiet: bool = False, **options):
    """`load_model(spec, **options)`, saying on stderr what it loads and in which dtype and why
    (what the commands print); `quiet`: no progress bars."""


    log.info("loading %s ...", spec)
    if quiet:
        quiet_model_loading()
    loaded = load_model(spec, **options)
    announce(loaded[2].dtype)
    return loaded


def check_context_length(model, seq_len: int, option: str = "--seq-len") -> None:
    """Refuse sequences longer than the model's context (its position embeddings end there)."""

    limit = getattr(text_config(model), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DepthcutError(f"{option} {seq_len} is beyond this model's context of {limit} tokens")

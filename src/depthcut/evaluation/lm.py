"""depthcut's scorer as an lm-evaluation-harness model, registered under the name ``depthcut``.

`DepthcutLM` encodes requests exactly as lm-eval's `HFLM` does (same `tok_encode`, the same
trailing-space move and empty-context prefix token, the same left truncation to the model's
context length), then scores them with `Scorer`, which computes each shared context once (see
scoring.py): the same answers as `HFLM` in float32, about twice as fast on multiple-choice tasks.

    lm = DepthcutLM(model, tokenizer)                  # a model in memory (a pruned one, say)
    lm = DepthcutLM("smollm2-135m", dtype="float32")   # anything depthcut.load_model takes
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

The lm-eval command line reaches it as ``python -m depthcut.lm_eval --model depthcut
--model_args pretrained=MODEL ...`` (docs/tasks.md): plain ``lm_eval`` has no plugin mechanism
for models outside its own package.
"""

from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401  (lm-eval's own models first: the registry imports them only while empty)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.models.utils_hf import stop_sequences_criteria
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from depthcut.evaluation.scoring import Scorer
from depthcut.model.distributed import rank_and_world
from depthcut.model.loading import load_model

log = logging.getLogger(__name__)


def largest_batch(fits, limit: int) -> int:
    """The largest batch size up to `limit` for which `fits(size)` is True, found by doubling and then
    halving the gap (a size that fits is assumed to fit for every smaller one); at least 1."""
    good, size = 0, 1
    while size <= limit and fits(size):
        good, size = size, size * 2
    bad = min(size, limit + 1)  # the smallest size known not to fit (or past the limit)
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return max(good, 1)


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def probe_batch_size(model, max_length: int, limit: int = 64) -> int:
    """lm-eval's --batch_size auto, as its `hf` model does it: the largest batch of `max_length`-token
    rows that one forward pass holds in GPU memory. On a CPU an allocation that does not fit is not an
    error Python sees (the system kills the process), so it answers the default of 16."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        log.info("--batch_size auto: 16 on %s (memory is probed on GPUs only)", device)
        return 16

    def fits(size: int) -> bool:
        try:
            with torch.inference_mode():
                model(input_ids=torch.ones(size, max_length, dtype=torch.long, device=device), use_cache=False)
            return True
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not _out_of_memory(error):
                raise
            return False
        finally:
            torch.cuda.empty_cache()

    size = largest_batch(fits, limit)
    log.info("--batch_size auto: %d rows of %d tokens fit on %s", size, max_length, device)
    return size


def _batch_size(value, model, max_length: int, limit: int) -> int:
    """lm-eval's --batch_size: a number, or "auto" / "auto:N" (probed: `probe_batch_size`)."""
    if isinstance(value, str) and value.startswith("auto"):
        return probe_batch_size(model, max_length, limit)
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    return size


@register_model("depthcut")
class DepthcutLM(TemplateLM):
    """A causal LM scored with depthcut's packed/shared-context scorer.

    `pretrained` is a model in memory (with `tokenizer`) or a MODEL string for
    `depthcut.load_model` (a local folder, a .gguf file, the built-in ``smollm2-135m``, a hub id),
    loaded with `dtype` ("auto", "checkpoint" or a dtype name) on `device`. `scoring` is
    "packed", "shared" or "full" (scoring.py); `batch_size` counts distinct contexts per forward
    pass. `add_bos_token`, `prefix_token_id`, `max_length` and `max_gen_toks` mean what they mean
    for lm-eval's `hf` model. `progress=False` silences the progress bars whatever lm-eval asks.
    """

    def __init__(self, pretrained, tokenizer=None, *, batch_size=16, scoring: str = "packed", dtype: str = "auto",
                 device: str | None = None, device_map: str | None = None, trust_remote_code: bool = False,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, progress: bool = True, **unused):
        super().__init__()
        max_batch_size = int(unused.pop("max_batch_size", None) or 64)  # the ceiling of "auto"
        if unused:
            raise TypeError(f"DepthcutLM got unknown arguments: {', '.join(sorted(unused))}")
        if isinstance(pretrained, str):
            if device and device.startswith("cuda") and not torch.cuda.is_available():
                log.warning("device %s is not available here; using the CPU", device)  # lm-eval's default is cuda:0
                device = "cpu"
            model, loaded_tokenizer, source = load_model(pretrained, dtype=dtype, device=device or "cpu",
                                                         trust_remote_code=trust_remote_code, device_map=device_map)
            tokenizer = tokenizer or loaded_tokenizer
            self.source = source.as_dict()
        else:
            if tokenizer is None:
                raise ValueError("a model in memory needs its tokenizer: DepthcutLM(model, tokenizer)")
            model, self.source = pretrained, {"spec": type(pretrained).__name__}
            if isinstance(tokenizer, str):
                tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
        self.model, self.tokenizer = model, tokenizer
        self._device = next(model.parameters()).device
        # Launched as several processes (accelerate launch, torchrun): lm-eval gives each its share of
        # the requests by rank and gathers the results through all_gather / gather_object below.
        self._rank, self._world_size = rank_and_world(self._device)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.progress = progress
        self._max_length = max_length or resolve_max_length(getattr(model, "config", None), tokenizer)
        self._max_gen_toks = max_gen_toks
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad_id if pad_id is not None else 0
        size = _batch_size(batch_size, model, self._max_length, max_batch_size)
        self.scorer = Scorer(model, batch_size=size, max_length=self._max_length, mode=scoring,
                             pad_id=self.pad_token_id)

    # ------------------------------------------------------------------ what lm-eval asks of a model
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor`, in rank order: stacked for a scalar, concatenated otherwise."""
        if self._world_size == 1:
            return tensor
        gathered = [torch.empty_like(tensor) for _ in range(self._world_size)]
        torch.distributed.all_gather(gathered, tensor)
        return torch.stack(gathered) if tensor.dim() == 0 else torch.cat(gathered)

    def gather_object(self, obj, dst: int = 0):
        """Every process's `obj` in a list on rank `dst`, None on the others."""
        if self._world_size == 1:
            return [obj]
        gathered = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self._world_size > 1:
            torch.distributed.barrier()

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As `HFLM.tok_encode`: the tokenizer's own special tokens unless told otherwise, and
        none added in front of a string that already starts with the prefix token's text."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model_source": self.source, "model_dtype": str(next(self.model.parameters()).dtype),
                "scoring": self.scorer.mode}

    def _quiet(self, disable_tqdm: bool) -> bool:
        return disable_tqdm or not self.progress

    # ------------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(logprob, is_greedy) of each request's continuation given its context, in request order."""
        return super().loglikelihood(requests, disable_tqdm=self._quiet(disable_tqdm))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(logprob, is_greedy) per ((context, continuation), context tokens, continuation tokens), in order."""
        pairs = [(context, continuation) for _, context, continuation in requests]
        scores = self.scorer.score(pairs, progress=not self._quiet(disable_tqdm), desc="loglikelihood")
        for (strings, _, _), answer in zip(requests, scores):
            if strings is not None and strings[0] is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of the context length, as `HFLM` scores them."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(window)
                owners.append(index)
        scores = self.scorer.score(windows, progress=not self._quiet(disable_tqdm), desc="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for owner, (value, _) in zip(owners, scores):
            totals[owner] += value
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generation with the model's own `generate`: greedy unless the task asks for sampling,
        until a stop sequence (and the EOS text) or `max_gen_toks` new tokens. Requests with the same
        generation settings are batched, longest context first; answers come back in request order."""
        results: list[str] = [""] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(self.tok_encode(requests[i].args[0])))
        by_settings: dict[str, list[int]] = {}
        for i in order:
            by_settings.setdefault(repr(sorted(requests[i].args[1].items())), []).append(i)
        eos = self.tokenizer.decode(self.eot_token_id) if self.eot_token_id is not None else None
        bar = tqdm(total=len(requests), desc="generate_until", disable=self._quiet(disable_tqdm))
        for indices in by_settings.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            kwargs.pop("max_length", None)
            if not kwargs.get("do_sample"):
                kwargs.pop("temperature", None)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in batch], until, max_new, kwargs)
                for i, text in zip(batch, texts):
                    results[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(batch))
        bar.close()
        return results

    def _generate(self, contexts: list[str], until: list[str], max_new: int, kwargs: dict) -> list[str]:
        room = max(self.max_length - max_new, 1)  # the context keeps its last tokens, as in HFLM
        rows = [self.tok_encode(c)[-room:] for c in contexts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):  # left-padded
            ids[b, width - len(row):] = torch.tensor(row)
            mask[b, width - len(row):] = 1
        output = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new,
            stopping_criteria=stop_sequences_criteria(self.tokenizer, until, width, len(rows)),
            pad_token_id=self.pad_token_id, use_cache=True, **kwargs)
        return [self.tokenizer.decode(row[width:].tolist(), skip_special_tokens=True) for row in output]

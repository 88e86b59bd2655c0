"""`shrink_to`: the best smaller model in one call. One analysis chooses candidate cuts (the best few
contiguous blocks by angular distance, the deepest block, Block Influence's layers); every candidate
is tried plain and with each training-free repair, each scored on validation text no fit saw (the
KL divergence from the unpruned model's next-token distribution, and the loss, over windows); a
repair is kept only where it beats the plain cut of its block by more than `margin` standard errors
of the paired difference (do no harm); the winner is written as `depthcut prune` writes it, with
the decision table in its provenance (`selection`). The options and their scoring (the screening,
the refinements) are in `depthcut.selection.decision`."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from depthcut.analysis.checkpoint import open_checkpoint
from depthcut.analysis.passes import analyze, analyze_streamed
from depthcut.errors import DepthcutError
from depthcut.evaluation.tasks import resolve_tasks
from depthcut.io.claims import claimed_for_writing
from depthcut.io.data import load_texts
from depthcut.io.model_folder import parameter_count
from depthcut.io.output_checks import check_no_overlap
from depthcut.model.distributed import is_main_process
from depthcut.model.layers import find_layer_stack, text_config
from depthcut.model.loading import resolve_device, resolve_model
from depthcut.model.precision import choose_dtype
from depthcut.model.surgery import remove_layers
from depthcut.pipeline.analyze import should_stream
from depthcut.pipeline.common import check_data_options, check_positive, load
from depthcut.pipeline.configs import PruneConfig, ShrinkConfig
from depthcut.pipeline.options import make_config
from depthcut.pipeline.preflight import check_before_loading
from depthcut.pipeline.prune import PruneResult, gguf_output, prune_with
from depthcut.pipeline.prune_backends import Prepared
from depthcut.pipeline.prune_choice import cut_refusal
from depthcut.pipeline.prune_repair import repair_record, repair_samples, tokenizer_of
from depthcut.pipeline.shrink_steps import evaluate_winner, heal_winner, minutes, peak_memory_bytes, plan_for_budget
from depthcut.pipeline.validation import references, unpruned_losses, validation_sets
from depthcut.repair import REPAIRS
from depthcut.selection.decision import MemoryScorer, Option, may_keep, plain_cuts, scored_options, standing
from depthcut.selection.decision_table import decision_table  # noqa: F401 (re-exported: printed by the CLI)
from depthcut.selection.fits import BlockFits, every_block_gatherer, fold
from depthcut.selection.layer_major import (
    StreamedBlockFits,
    StreamedScorer,
    check_streamable,
    checkpoint_location,
    streamed_writer,
)
from depthcut.selection.search import greedy_search, search_cost
from depthcut.strategies import check_drop, select

log = logging.getLogger(__name__)


def parse_count(text: str) -> int:
    """"100M", "1.5B", "95000000" -> a parameter count."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
    text = text.strip().upper().replace("_", "")
    try:
        value = float(text[:-1]) * scale[text[-1]] if text and text[-1] in scale else float(text)
    except ValueError:
        raise DepthcutError(f"--params {text!r} is not a count such as 100M, 1.5B or 95000000") from None
    if not value > 0:
        raise DepthcutError(f"--params must be positive, got {text}")
    return int(value)


def drop_for_params(model, layer_path: str | None, most: int) -> int:
    """The fewest layers whose removal brings `model` to at most `most` parameters, the layers taken
    as equal (their mean size); a count no cut reaches is an error that says what is possible."""
    stack = find_layer_stack(model, layer_path)
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for layer in stack.layers for p in layer.parameters()) / len(stack)
    drop = max(0, -(-(total - most) // per_layer))  # ceiling
    if drop < 1:
        raise DepthcutError(f"the model has {total:,} parameters, already no more than --params {most:,}")
    if drop >= len(stack):
        smallest = total - per_layer * (len(stack) - 1)
        raise DepthcutError(f"--params {most:,} is out of reach: removing all but one of the {len(stack)} layers leaves "
                            f"about {smallest:,.0f} parameters (the embeddings and the head stay)")
    return int(drop)


def _check(config: ShrinkConfig) -> None:
    if sum(value is not None for value in (config.drop, config.fraction, config.params)) != 1:
        raise DepthcutError("give one of --drop N, --fraction F or --params P")
    if config.params is not None:
        parse_count(config.params)
    if config.fraction is not None and not 0 < config.fraction < 1:
        raise DepthcutError(f"--fraction must be between 0 and 1, got {config.fraction}")
    check_positive(drop=config.drop, candidates=config.candidates, validation_windows=config.validation_windows,
                   finalists=config.finalists)
    if config.screen_windows < 0:
        raise DepthcutError(f"--screen-windows must be 0 (no screening) or more, got {config.screen_windows}")
    if config.margin < 0:
        raise DepthcutError(f"--margin must be 0 or more, got {config.margin}")
    check_positive(heal_steps=config.heal_steps, limit=config.limit, heal_seq_len=config.heal_seq_len,
                   heal_batch_size=config.heal_batch_size)
    if config.heal_steps:
        if gguf_output(config.out):
            raise DepthcutError(f"--heal-steps writes a healed Hugging Face folder, not a .gguf file: shrink to a folder "
                                f"(convert it afterwards), or leave --heal-steps out for {config.out}")
        try:
            config.recipe()  # its own checks, in its own option names
        except DepthcutError as error:
            raise DepthcutError(str(error).replace("--lr ", "--heal-lr ")) from None
    if gguf_output(config.out) and not resolve_model(config.model).gguf_file:
        raise DepthcutError(f"--out {config.out} asks for a .gguf file, which depthcut writes only from a GGUF model; "
                            f"{config.model} is not one (shrink it to a folder instead)")
    for name in config.repairs:
        if name != "none":
            REPAIRS.check(name)
    check_data_options(config)
    if config.budget is not None and not (math.isfinite(config.budget) and config.budget > 0):
        raise DepthcutError(f"--budget must be a positive number of minutes, got {config.budget}")
    if config.tasks:
        resolve_tasks(config.tasks)
        if gguf_output(config.out):
            raise DepthcutError("--tasks evaluates a Hugging Face folder: shrink to a folder, or evaluate the .gguf "
                                "with `depthcut eval` afterwards")
    for name in config.validation_sources():  # a validation source that is not there fails before any model loads
        if not name.startswith("hf:"):
            load_texts(name, config.text_field)


def _candidates(config: ShrinkConfig, analysis, drop: int, refusal) -> list[tuple[list[int], str]]:
    """The cuts to try, allowed ones only: the best blocks by angular distance, the deepest, Block Influence's."""
    found = []
    for first, stop in analysis.ranked_blocks(drop):
        if len([f for f in found if f[1] == "angular"]) >= config.candidates:
            break
        if refusal(list(range(first, stop))) is None:
            found.append((list(range(first, stop)), "angular"))
    for strategy in ("deepest", "block-influence"):
        layers = select(strategy, drop, analysis.num_layers, analysis)
        if refusal(layers) is None and all(layers != known for known, _ in found):
            found.append((layers, strategy))
    if not found:
        raise DepthcutError(f"no cut of {drop} layers that this model allows was found among the candidates")
    return found


def _decide(options: list[Option], config: ShrinkConfig, unpruned: dict | None = None) -> Option:
    """Mark which repairs are kept (beating their plain cut beyond `margin` paired standard errors, on
    every source or on their mean) and return the best kept option."""
    plain = plain_cuts(options)
    for option in options:
        if option.refused or option.screened:
            continue
        verdict = may_keep(option, plain, config, unpruned)
        option.kept, option.why, option.decided_by = verdict.better, verdict.why, verdict.decided_by
        if option.repair != "none":
            option.why += ": kept" if option.kept else ": the plain cut is kept"
        elif not option.kept:
            option.why += ": the best plain block is kept"
    return min((o for o in options if o.kept), key=lambda o: o.score(config.aggregate))


def shrink_to(config: ShrinkConfig | None = None, /, **fields) -> PruneResult:
    """Choose and write the best smaller model, as `depthcut shrink` does (see the module's docstring).

    `shrink_to(model="smollm2-135m", drop=8, validate=("c4", "wikitext"), out="smaller")`; returns the
    prune's result, whose provenance holds the decision table under `selection`."""
    config = make_config(ShrinkConfig, config, fields)
    check_before_loading(config)  # the checks that need no weights (--drop against the config or GGUF header)
    _check(config)
    check_no_overlap([config.model, config.data, *config.validate], config.out)
    started = time.perf_counter()
    source = resolve_model(config.model)
    streamed = should_stream(config, source)
    if streamed:
        check_streamable(config, source)
    with claimed_for_writing(config.out, config.force, kind="file" if gguf_output(config.out) else "dir",
                             writer=is_main_process()):
        if streamed:
            return _shrink_streamed(config, source, started)
        model, tokenizer, source = load(config, quiet=config.quiet)
        num_layers = len(find_layer_stack(model, config.layer_path))
        drop = _drop(config, model, num_layers)
        # the repairs' own split, sized for the widest fit asked for
        samples = repair_samples(config, tokenizer, text_config(model).hidden_size, config.repairs)
        log.info("shrink: analyzing %s to find candidate blocks ...", samples.data)
        analysis_started = time.perf_counter()
        # every block's repair sums ride on the analysis pass: no calibration pass of their own after it
        gatherer = every_block_gatherer(model, samples.calibration, drop, list(config.repairs), config)
        analysis = analyze(model, tokenizer, samples.calibration, layer_path=config.layer_path,
                           batch_size=config.batch_size, metrics=list(config.metrics),
                           token_positions=config.token_positions, progress=not config.quiet,
                           riders=[gatherer] if gatherer else [])
        gathered = gatherer.result() if gatherer else {}
        analysis_seconds = time.perf_counter() - analysis_started
        repairs = list(dict.fromkeys(["none", *config.repairs]))
        plan, config = _plan(config, analysis_seconds, samples, repairs, started, bool(gathered))
        candidates = _candidates(config, analysis, drop, cut_refusal(model, _prune_view(config)))
        if plan is not None:
            candidates = candidates[: plan.candidates]
        validation = validation_sets(config, tokenizer, samples.held_out)
        seconds = {"analysis": analysis_seconds}
        search = _search(model, validation, drop, config, candidates, analysis_seconds / len(samples.calibration),
                         time.perf_counter() - started)
        seconds["search"] = search.get("seconds", 0.0)
        references_started = time.perf_counter()
        predictions = references(model, validation, config.batch_size, [layers for layers, _ in candidates],
                                 config.layer_path, config.allow_unknown_config, progress=not config.quiet)
        seconds["references"] = time.perf_counter() - references_started
        fits_started = time.perf_counter()
        fits = BlockFits(model, [layers for layers, _ in candidates], [m for m in repairs if m != "none"], samples,
                         config, gathered)
        seconds["fit_passes"] = time.perf_counter() - fits_started
        options = scored_options(MemoryScorer(model, predictions, config), fits, candidates, repairs, config, seconds)
        winner = _decide(options, config, unpruned_losses(predictions))
        healed = None
        if config.heal_steps:
            healed = heal_winner(model, tokenizer, winner, winner.fit, samples.fitted_on, predictions, config)
            row = Option(winner.layers, winner.found_by, f"{winner.repair}+heal", scores=healed.scores,
                         kept=healed.kept, why=healed.why, decided_by=healed.decided_by, seconds=healed.seconds)
            options.append(row)
            if healed.kept:
                winner = row
        selection = _selection(config, validation, options, winner, seconds, plan, healed, search)
        strategy = f"shrink ({winner.found_by})"
        prune = _prune_config(config, winner)
        base = _base_option(options, winner)  # the training-free option the winner is or grew from
        record = _repair_provenance(prune, options, base, samples, validation, config)
        if gguf_output(config.out):  # a GGUF written tensor by tensor, each kept one in its quantization
            del model, healed
            backend = streamed_writer(prune, source, base.fit, record)  # the repair as scored, not fitted again
            result = prune_with(prune, None, selection=selection, strategy=strategy, backend=backend)
        else:  # written as scored, in the dtype it was scored in: not fitted again, not loaded again
            if healed is not None and healed.kept:
                written, before, rewrite = healed.model, healed.parameters_before, healed.rewrite
            else:
                written, before = model, parameter_count(model)
                fold(written, base.fit, config.layer_path)
                rewrite = remove_layers(written, winner.layers, config.layer_path, config.allow_unknown_config)
            backend = Prepared(prune, source, written, tokenizer, winner.layers, num_layers=num_layers,
                               parameters_before=before, rewrite=rewrite, repair_record=record)
            result = prune_with(prune, None, selection=selection, strategy=strategy, backend=backend)
        if config.tasks:
            result.evaluation = evaluate_winner(config)  # OUT/eval.json: depthcut.json stays as written
        return result


def _drop(config: ShrinkConfig, model, num_layers: int) -> int:
    """The layers to remove: --drop, --fraction of the layers, or as few as bring the model to --params."""
    if config.params is not None:
        drop = drop_for_params(model, config.layer_path, parse_count(config.params))
    else:
        drop = config.drop if config.drop is not None else max(1, round(config.fraction * num_layers))
    check_drop(drop, num_layers)
    return drop


def _plan(config: ShrinkConfig, analysis_seconds: float, samples, repairs: list[str], started: float,
          sums_gathered: bool) -> tuple:
    """(the `--budget` plan or None, the config with its validation windows)."""
    if config.budget is None:
        return None, config
    plan = plan_for_budget(config, analysis_seconds, len(samples.calibration), len(config.validation_sources()),
                           len(repairs), time.perf_counter() - started, sums_gathered=sums_gathered)
    log.info("shrink: --budget %g min: %s", config.budget, plan.why)
    return plan, dataclasses.replace(config, validation_windows=plan.validation_windows)


def _prune_view(config: ShrinkConfig) -> PruneConfig:
    """The prune options that decide which cuts the architecture allows."""
    return PruneConfig(model=config.model, out=config.out, layer_path=config.layer_path,
                       allow_unknown_config=config.allow_unknown_config, trust_remote_code=config.trust_remote_code)


def _prune_config(config: ShrinkConfig, winner: Option, stream: bool = False) -> PruneConfig:
    """What `depthcut prune` is asked to write: the winner's layers and repair, with the shrink's settings."""
    return PruneConfig(model=config.model, out=config.out, force=config.force, quiet=config.quiet,
                       layers=",".join(map(str, winner.layers)), repair=winner.repair.removesuffix("+heal"),
                       data=config.data, text_field=config.text_field, samples=config.samples, seq_len=config.seq_len,
                       batch_size=config.batch_size, sample_mode=config.sample_mode, seed=config.seed,
                       dtype=config.dtype, device=config.device, layer_path=config.layer_path,
                       trust_remote_code=config.trust_remote_code, allow_unknown_config=config.allow_unknown_config,
                       stream=stream)


def _selection(config: ShrinkConfig, validation: dict, options: list[Option], winner: Option, seconds: dict,
               plan, healed, search: dict) -> dict:
    """The decision table and how it was made, as depthcut.json's `selection` records it."""
    return {"rule": f"lowest validation KL ({config.aggregate} over sources); a repair kept only where its "
                    f"KL is lower than its plain cut's beyond {config.margin:g} paired standard errors and "
                    "no source's loss higher beyond as many, a cut that is not one block only where it beats "
                    "the best plain block so"
                    + (", a heal only where it beats the unhealed winner so" if healed else ""),
            "validation": {name: windows.as_dict() for name, windows in validation.items()},
            "options": [o.row(config.aggregate) for o in options], "winner": winner.row(config.aggregate),
            "runner_up": standing(options, winner, config), "aggregate": config.aggregate,
            "margin": config.margin,
            "analysis_seconds": round(seconds["analysis"], 2),
            "seconds": {step: round(value, 2) for step, value in seconds.items()},
            "finalists": config.finalists, "screen_windows": config.screen_windows,
            "budget": plan.as_dict() if plan else None,
            "heal": healed.heal if healed else None, "search": search,
            "peak_memory_bytes": peak_memory_bytes()}


def _shrink_streamed(config: ShrinkConfig, source, started: float) -> PruneResult:
    """`shrink_to` for a checkpoint never loaded whole (`depthcut.selection.layer_major`): the same choice, every phase a
    walk over the layers holding one at a time."""
    location = checkpoint_location(source)
    device = resolve_device(config.device)
    choice = choose_dtype(config.dtype, device)
    skeleton, _, _ = open_checkpoint(location, choice.dtype, device, config.trust_remote_code)
    skeleton.tie_weights()  # built without tying: a tied head would count twice towards --params
    num_layers = len(find_layer_stack(skeleton, config.layer_path))
    drop = _drop(config, skeleton, num_layers)
    tokenizer = tokenizer_of(source, config.trust_remote_code)
    samples = repair_samples(config, tokenizer, text_config(skeleton).hidden_size, config.repairs)
    log.info("shrink: analyzing %s one layer at a time (%s) ...", samples.data, choice.dtype)
    analysis_started = time.perf_counter()
    analysis = analyze_streamed(location, tokenizer, samples.calibration, dtype=config.dtype, device=device,
                                layer_path=config.layer_path, batch_size=config.batch_size,
                                metrics=list(config.metrics), token_positions=config.token_positions,
                                progress=not config.quiet, trust_remote_code=config.trust_remote_code,
                                spill_dir=config.spill_dir)
    seconds = {"analysis": time.perf_counter() - analysis_started}
    repairs = list(dict.fromkeys(["none", *config.repairs]))
    plan, config = _plan(config, seconds["analysis"], samples, repairs, started, False)
    candidates = _candidates(config, analysis, drop, cut_refusal(skeleton, _prune_view(config)))
    if plan is not None:
        candidates = candidates[: plan.candidates]
    validation = validation_sets(config, tokenizer, samples.held_out)
    fits_started = time.perf_counter()
    fits = StreamedBlockFits(location, skeleton, [layers for layers, _ in candidates],
                             [m for m in repairs if m != "none"], samples, config, choice.dtype, device)
    seconds["fit_passes"] = time.perf_counter() - fits_started
    scorer = StreamedScorer(location, validation, config, choice.dtype, device)
    options = scored_options(scorer, fits, candidates, repairs, config, seconds)
    winner = _decide(options, config, scorer.unpruned_losses())
    selection = _selection(config, validation, options, winner, seconds, plan, None, {"method": "none"})
    selection["streamed"] = {"walks": scorer.walks, "dtype": str(choice.dtype).removeprefix("torch.")}
    prune = _prune_config(config, winner, stream=True)
    base = _base_option(options, winner)
    backend = streamed_writer(prune, source, base.fit,
                              _repair_provenance(prune, options, base, samples, validation, config))
    return prune_with(prune, None, selection=selection, strategy=f"shrink ({winner.found_by})", backend=backend)


def _search(model, validation, drop: int, config: ShrinkConfig, candidates: list, seconds_per_window: float,
            spent: float) -> dict:
    """Run `--search` (`depthcut.selection.search`) and add its cut to `candidates` (where no other candidate is that
    cut already); what the selection records of it. Left out, with why, where `--budget` cannot afford
    about a quarter of what is left for it."""
    if config.search == "none":
        return {"method": "none"}
    num_layers = len(find_layer_stack(model, config.layer_path))
    # the analysis pass stops before the head: 1.5x its seconds per window, as plan_for_budget prices it
    cost = search_cost(config, drop, num_layers, len(validation), 1.5 * seconds_per_window)
    if config.budget is not None and cost > 0.25 * (config.budget * 60 - spent):
        why = (f"left out: it would take about {minutes(cost)}, more than a quarter of the "
               f"{minutes(max(0.0, config.budget * 60 - spent))} --budget leaves")
        log.info("shrink: --search %s %s", config.search, why)
        return {"method": config.search, "why": why}
    log.info("shrink: searching (%s) for %d layers on the screening windows (about %s) ...", config.search, drop,
             minutes(cost))
    path = greedy_search(model, validation, drop, config)
    record = path.as_dict()
    layers = sorted(path.order)
    same = next((found_by for known, found_by in candidates if known == layers), None)
    if len(layers) < drop:
        record["why"] = f"stopped after {len(layers)} of {drop} layers: no further layer may be removed"
    elif same is not None:
        record["why"] = f"found the cut {same} proposes already"
    else:
        candidates.append((layers, path.method))
    return record


def _base_option(options: list[Option], winner: Option) -> Option:
    """The training-free option `winner` is, or the one a healed winner grew from."""
    for option in options:
        if option.layers == winner.layers and option.repair == winner.repair.removesuffix("+heal"):
            return option
    raise AssertionError("a winner that is no option")  # _decide picks among the options


def _repair_provenance(prune: PruneConfig, options: list[Option], base: Option, samples, validation,
                       config: ShrinkConfig) -> dict | None:
    """What provenance records of the winner's repair, as `prune --repair` records it (None: the plain cut)."""
    if base.fit is None:
        return None
    plain = next(o for o in options if o.layers == base.layers and o.repair == "none")
    record = repair_record(prune, base.fit, samples.calibration, samples.heldout, samples.data)
    record["validation"] = {
        "sources": {name: windows.as_dict() for name, windows in validation.items()},
        "plain": {name: scores.summary() for name, scores in plain.scores.items()},
        "repaired": {name: scores.summary() for name, scores in base.scores.items()},
        "beats_plain": base.kept, "why": base.why, "decided_by": base.decided_by, "policy": "keep",
        "margin": config.margin,
        "aggregate": config.aggregate}
    record["applied"] = True
    return record


shrink = shrink_to  # `depthcut.shrink(...)`

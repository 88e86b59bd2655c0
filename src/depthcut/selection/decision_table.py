"""The decision table `depthcut shrink` prints, read from the provenance's `selection` (so the same
table can be printed again from any `depthcut.json`): every option with the score it is ranked by,
each source's KL and loss, whether it was kept and which criterion of the do-no-harm rule decided,
the winner marked, and whether it is ahead of the runner-up beyond the noise. Reasons are wrapped,
never cut."""

from __future__ import annotations

import textwrap
from pathlib import Path

WIDTH = 118
REASON_INDENT = " " * 8
WINNER_MARK = "*"


def contiguous(layers: list[int]) -> bool:
    return layers == list(range(layers[0], layers[-1] + 1))


def span(layers: list[int]) -> str:
    """[l, l+n) for a block, else the layers by commas."""
    return f"[{layers[0]}, {layers[-1] + 1})" if contiguous(layers) else ",".join(map(str, layers))


def _wrapped(text: str, indent: str = REASON_INDENT) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ")


def _same(row: dict, other: dict) -> bool:
    return row["layers"] == other["layers"] and row["repair"] == other["repair"]


def _verdict(row: dict) -> str:
    if row["refused"]:
        return "refused"
    if row.get("screened"):
        return "out"
    if row["kept"]:
        return "yes"
    return f"no ({row['decided_by']})" if row.get("decided_by") else "no"


def decision_table(selection: dict) -> list[str]:
    """The decision table as `depthcut shrink` prints it, from the provenance's `selection`."""
    sources = list(selection.get("validation", {}))
    if not sources:  # a selection recorded before the sources were: take them from the scored rows
        sources = list(dict.fromkeys(name for row in selection["options"] for name in row["validation"]))
    aggregate = selection.get("aggregate", "worst")
    legend = (f"Options, scored on validation text no fit saw ({', '.join(sources)}): KL(unpruned || option) in nats per "
             f"token ± one standard error over windows, and the loss in brackets. Ranked by the {aggregate} source's "
             "KL: lower is closer to the unpruned model. The winner is starred (*); kept: may be chosen (a repair, heal or "
             "scattered cut only where its KL is lower beyond the margin and no source's loss higher: which decided "
             "in brackets); out: screened out on its first windows.")
    lines = textwrap.wrap(legend, WIDTH)
    columns = "".join(f"  {name[:24]:<26}" for name in sources)
    lines.append(f"  {'layers':<18} {'found by':<15} {'repair':<13} {'rank KL':>8}{columns}  kept")
    winner = selection["winner"]
    for row in selection["options"]:
        mark = WINNER_MARK if _same(row, winner) and row["kept"] else " "
        score = f"{row['score']:.4f}" if row.get("score") is not None else "-"
        cells = ""
        for name in sources:
            s = row["validation"].get(name)
            cell = f"{s['kl']:.4f} ± {s['kl_stderr']:.4f} ({s['loss']:.3f})" if s else "-"
            cells += f"  {cell:<26}"
        head = f"{mark} {span(row['layers']):<18} {row['found_by']:<15} {row['repair']:<13} {score:>8}"
        lines.append(f"{head}{cells}  {_verdict(row)}")
        if row["refused"]:
            lines.extend(_wrapped(f"refused: {row['refused']}"))
        elif not row["kept"] and row.get("why"):
            lines.extend(_wrapped(row["why"]))
    lines.extend(_conclusion(selection))
    return lines


def _conclusion(selection: dict) -> list[str]:
    winner = selection["winner"]
    score = f", rank KL {winner['score']:.4f}" if winner.get("score") is not None else ""
    lines = _wrapped(f"chosen: layers {span(winner['layers'])} ({winner['found_by']}), repair {winner['repair']}"
                     f"{score}: {winner['why']}", indent="")
    runner = selection.get("runner_up")
    if runner:
        level = ("level with it within the noise: another seed or more windows could pick either"
                 if runner["level"] else "ahead of it beyond the noise")
        lines.extend(_wrapped(f"runner-up: layers {span(runner['layers'])} ({runner['found_by']}), repair "
                              f"{runner['repair']}, rank KL {runner['score']:.4f}; the winner is {level} "
                              f"({runner['why']})", indent=""))
    return lines


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# What a KL meant on SmolLM2-135M (docs/choosing.md, from the project's own evidence): (below, words)
KL_SCALE = ((0.6, "a mild cut: on SmolLM2-135M, cuts below 0.6 kept 92-99% of arc_easy and piqa"),
            (1.5, "on SmolLM2-135M, cuts of 0.6 to 1.5 kept 73-92% of arc_easy: expect fluent text that knows less"),
            (3.0, "on SmolLM2-135M, cuts of 1.5 to 3 kept about two thirds of arc_easy: expect many wrong facts"),
            (float("inf"), ("on SmolLM2-135M, cuts above 3 kept about half of arc_easy or less, near guessing "
                            "above 4: expect fluent-looking nonsense until it is healed")))


def disk_bytes(location: Path) -> int | None:
    """The bytes of a model's weights on disk: a file, or a folder's weight files; None where not found."""
    if location.is_file():
        return location.stat().st_size
    if location.is_dir():
        return sum(p.stat().st_size for p in location.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return None


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M" if parameters >= 1e6 else (
        f"{parameters:,}")


def _megabytes(count: int | None) -> str:
    return "?" if count is None else f"{count / 1e6:,.1f} MB"


def size_lines(provenance: dict) -> list[str]:
    """Parameters and bytes on disk before and after, and where a .gguf output would be smaller."""
    base = provenance["base_model"]
    source = Path(base["location"]) / base["gguf_file"] if base.get("gguf_file") else Path(base["location"])
    output = Path(provenance["output"]["path"])
    before, after = disk_bytes(source), disk_bytes(output)
    params_before, params_after = provenance["parameters_before"], provenance["parameters_after"]
    written_as = ("GGUF, every kept tensor in its quantization" if provenance["output"].get("format") == "gguf"
                  else f"safetensors, {provenance.get('dtype') or 'as stored'}")
    lines = [(f"size: {_count(params_before)} -> {_count(params_after)} parameters "
              f"({1 - params_after / params_before:.0%} fewer); on disk {_megabytes(before)} "
              f"({'GGUF' if base.get('gguf_file') else 'as stored'}) -> {_megabytes(after)} ({written_as})")]
    if base.get("gguf_file") and provenance["output"].get("format") != "gguf" and before and after and after > before:
        lines.extend(_wrapped(f"the output is larger on disk than the input: the GGUF stores its weights quantized, "
                              f"a folder in {provenance.get('dtype')}; --out NAME.gguf keeps the quantization (about "
                              f"{_megabytes(round(before * params_after / params_before))}), at the cost of a "
                              "model only llama.cpp and transformers' GGUF loader read", indent=""))
    return lines


def expectation_lines(provenance: dict, out: str) -> list[str]:
    """What to expect of the winner at this depth, and the heal to run next where it was not healed."""
    winner = provenance["selection"]["winner"]
    removed, total = len(provenance["removed_layers"]), provenance["num_layers_before"]
    kl = winner.get("score")
    lines = []
    if kl is not None:
        scale = next(words for below, words in KL_SCALE if kl < below)
        lines += _wrapped(f"what to expect: {removed} of {total} layers removed ({removed / total:.0%}); the winner's "
                          f"KL from the unpruned model is {kl:.2f} nats per token, so its loss on such text is about "
                          f"that much higher ({scale}; docs/choosing.md)", indent="")
    if winner["repair"].endswith("+heal"):
        lines.append("healed: the heal beat the unhealed winner on validation text, and was kept")
    else:
        lines += _wrapped(f"next: heal it, e.g. `depthcut heal {out} --data c4 --steps 50 --seq-len 256 --batch-size 4 "
                          f"--out {out}-healed` (minutes on a CPU for a model of this size; those 50 LoRA steps "
                          "lowered SmolLM2-135M's test loss by 0.2 to 1.2 nats at 4 to 12 of 30 layers), or run "
                          "shrink again with --heal-steps 50", indent="")
    return lines

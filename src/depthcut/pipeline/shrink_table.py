"""The decision table `depthcut shrink` prints, read from the provenance's `selection` (so the same
table can be printed again from any `depthcut.json`): every option with the score it is ranked by,
each source's KL and loss, whether it was kept and which criterion of the do-no-harm rule decided,
the winner marked, and whether it is ahead of the runner-up beyond the noise. Reasons are wrapped,
never cut."""

from __future__ import annotations

import textwrap

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
    lines = [f"Options, scored on validation text no fit saw ({', '.join(sources)}): KL(unpruned || option) in nats per "
             f"token ± one standard error over windows, and the loss in brackets. Ranked by the {aggregate} source's "
             "KL: lower is closer to the unpruned model. The winner is starred (*); kept: may be chosen (a repair, heal or "
             "scattered cut only where its KL is lower beyond the margin and no source's loss higher: which decided "
             "in brackets); out: screened out on its first windows."]
    lines = [line for text in lines for line in textwrap.wrap(text, WIDTH)]
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

"""Issue 14's evidence: training-free repairs beside LoRA and distillation on SmolLM2-135M.

For the angular and the deepest block at each drop count (default 8, 4, 12 of 30 layers, in that order), every
method: none (plain pruning), lstsq, cosine, magnitude (training-free), LoRA for N steps, KD for the
same N steps (distillation from the unpruned model), and lstsq followed by LoRA. Each is measured by
held-out C4 loss (with the share of the pruning gap it closes), arc_easy and piqa (full sets unless
--limit), and its wall time.

C4's documents are split once: the repairs are fitted and the heals trained on one part; the loss is
measured on the other, which neither saw. One sweep folder (`depthcut.pipeline.sweep_to`) holds every
point, filled a drop count at a time by two sweeps: the repairs with LoRA after plain pruning and
after lstsq (`--heal-after none,lstsq`), then KD after plain pruning (`--heal-objective kd`). Its
results.jsonl is appended point by point, so a killed run continues where it stopped; the sweep's
report.html draws the methods side by side.

    .venv/bin/python benchmarks/repair_evidence.py --out /tmp/repair_evidence --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import environment

# C4 and the benchmarks are read from the reference data beside the project (../shared/data) unless told otherwise.
os.environ.setdefault("DEPTHCUT_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def split_c4(folder: Path, heldout_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """fit.jsonl and heldout.jsonl: a seeded split of the C4 sample's documents."""
    from depthcut.io.data import load_texts

    documents = load_texts("c4").documents
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    count = round(len(order) * heldout_fraction)
    paths = folder / "fit.jsonl", folder / "heldout.jsonl"
    for path, indices in zip(paths, (order[count:], order[:count])):
        text = "".join(json.dumps({"text": documents[i]}) + "\n" for i in sorted(indices))
        if not path.is_file() or path.read_text() != text:  # a second run beside the first never rewrites them
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(text)
            temporary.replace(path)
    return paths


METHODS = {("none", ""): "none", ("lstsq", ""): "lstsq", ("cosine", ""): "cosine", ("magnitude", ""): "magnitude",
           ("none", "lm"): "LoRA", ("none", "kd"): "KD", ("lstsq", "lm"): "lstsq+LoRA", ("lstsq", "kd"): "lstsq+KD"}


def table(sweep_folders: list[Path], tasks: list[str]) -> list[str]:
    """One row per (strategy, drop, method): held-out loss, the share of the pruning gap closed,
    task accuracies and the method's own seconds (the repair's fit plus the heal; measuring is
    the same for every method and left out). Several folders (copies of one sweep continued apart,
    e.g. one per strategy) are read as one."""
    from depthcut.sweep.report import gap_closed
    from depthcut.sweep.results import ResultsLog, configuration, task_accuracy

    points = list({key: point for folder in sweep_folders
                   for key, point in ResultsLog(folder).points().items()}.values())
    base = next(p for p in points if p["drop"] == 0)
    rows = []
    for point in points:
        strategy, repair, heal = configuration(point)
        name = METHODS.get((repair, heal))
        if not point["drop"] or name is None:
            continue
        plain = next((p for p in points if p["drop"] == point["drop"] and configuration(p) == (strategy, "none", "")),
                     None)
        seconds = (point.get("repair_fit") or {}).get("seconds", 0) + (point.get("heal") or {}).get("seconds", 0)
        accuracies = [task_accuracy(point, t)[0] for t in tasks]
        gap = gap_closed(point, plain, base) if plain else None
        rows.append((strategy, point["drop"], name, point["loss"]["loss"], gap, accuracies, seconds))
    order = list(METHODS.values())
    rows.sort(key=lambda r: (r[0], r[1], order.index(r[2])))
    base_acc = " ".join(f"{task_accuracy(base, t)[0]:.4f}" for t in tasks)
    lines = [f"unpruned: loss {base['loss']['loss']:.4f}, {' '.join(tasks)} {base_acc}",
             f"{'strategy':9} {'drop':>4} {'method':11} {'loss':>7} {'gap closed':>10} "
             + " ".join(f"{t:>9}" for t in tasks) + "  seconds"]
    for strategy, drop, name, loss, gap, accuracies, seconds in rows:
        closed = "-" if gap is None or name == "none" else f"{100 * gap:.0f}%"
        lines.append(f"{strategy:9} {drop:>4} {name:11} {loss:7.4f} {closed:>10} "
                     + " ".join(f"{a:9.4f}" if a is not None else f"{'-':>9}" for a in accuracies)
                     + f"  {seconds:7.1f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--drop", default="8,4,12", help="drop counts, run in this order, each with every method")
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: the full sets)")
    parser.add_argument("--steps", type=int, default=50, help="LoRA and KD steps")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--samples", type=int, default=64, help="calibration windows for analysis and repairs")
    parser.add_argument("--loss-samples", type=int, default=64)
    parser.add_argument("--strategies", default="angular,deepest",
                        help="the blocks compared. Copies of one sweep folder (--sweep) can be continued apart, one "
                             "strategy each, and read as one (--also); on 2 cores two such runs of 1 thread "
                             "each were slower than one run of 2 threads (24 min against about 20 for two KD points)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--sweep", default="sweep", help="the sweep folder's name under --out")
    parser.add_argument("--also", type=Path, action="append", default=[],
                        help="another sweep folder whose points the final table includes")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import depthcut
    from depthcut.pipeline import sweep_to
    from depthcut.repair import check_repair

    args.out.mkdir(parents=True, exist_ok=True)
    repairs, refused = ["none"], []
    probe, _, _ = depthcut.load_model(args.model, dtype="float32")
    for method in ("lstsq", "cosine", "magnitude"):
        try:
            check_repair(probe, range(4, 8), method)
            repairs.append(method)
        except depthcut.DepthcutError as refusal:
            refused.append(f"{method}: refused ({refusal})")
    del probe
    fit_data, heldout = split_c4(args.out)
    sweep_folder = args.out / args.sweep
    common = dict(model=args.model, dtype=args.dtype, out=str(sweep_folder),
                  strategies=tuple(args.strategies.split(",")),
                  data=str(fit_data), samples=args.samples, seq_len=args.seq_len, tasks=tuple(args.tasks.split(",")),
                  limit=args.limit, loss=str(heldout), loss_samples=args.loss_samples, loss_seq_len=args.seq_len,
                  heal=True, heal_data=str(fit_data), heal_steps=args.steps, heal_seq_len=args.seq_len,
                  heal_batch_size=args.batch_size, heal_warmup_steps=args.warmup, heal_heldout_windows=8, quiet=True)
    # One drop count at a time, every method at it, so that a run cut short holds whole comparisons.
    # Two sweeps into one folder: the repairs with LoRA after none and after lstsq; then KD after none.
    drops = [int(d) for d in args.drop.split(",") if int(d)]
    for drop in drops:
        sweep_to(**common, drop=f"0,{drop}", repair=tuple(repairs), heal_objective=("lm",),
                 heal_after=tuple(r for r in ("none", "lstsq") if r in repairs))
        sweep_to(**common, drop=f"0,{drop}", repair=("none",), heal_objective=("kd",))
    lines = table([sweep_folder, *args.also], args.tasks.split(",")) + refused
    facts = environment.record("cpu", args.dtype)
    lines.append(f"CPU capability {facts.get('cpu_capability')}, {facts.get('cpu')}")
    print("\n".join(lines))
    (args.out / "evidence.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

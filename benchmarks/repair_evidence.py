"""Issue 14's evidence: training-free repairs beside LoRA and distillation on SmolLM2-135M.

For the angular and the deepest block at each drop count (default 4, 8, 12 of 30 layers), every
method: none (plain pruning), lstsq, cosine, magnitude (training-free), LoRA for N steps, KD for the
same N steps (distillation from the unpruned model), and lstsq followed by LoRA. Each is measured by
held-out C4 loss (with the share of the pruning gap it closes), arc_easy and piqa (full sets unless
--limit), and its wall time.

C4's documents are split once: the repairs are fitted and the heals trained on one part; the loss is
measured on the other, which neither saw. The sweep (`depthcut.pipeline.sweep_to`) runs none, the
repairs and LoRA (after none and after lstsq) and keeps its results.jsonl, so a killed run continues;
the KD points are appended to kd.jsonl beside it.

    .venv/bin/python benchmarks/repair_evidence.py --out /tmp/repair_evidence --steps 50
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import environment


def split_c4(folder: Path, heldout_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """fit.jsonl and heldout.jsonl: a seeded split of the C4 sample's documents."""
    from depthcut.data import load_texts

    documents = load_texts("c4").documents
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    count = round(len(order) * heldout_fraction)
    paths = folder / "fit.jsonl", folder / "heldout.jsonl"
    for path, indices in zip(paths, (order[count:], order[:count])):
        path.write_text("".join(json.dumps({"text": documents[i]}) + "\n" for i in sorted(indices)))
    return paths


def _kd_points(args, fit_data: Path, heldout: Path, sweep_folder: Path) -> list[dict]:
    """KD for N steps on each pruned point of the sweep, measured as the sweep measures."""
    import copy

    import depthcut
    from depthcut.data import load_texts
    from depthcut.evaluation import evaluate
    from depthcut.healing.recipe import HealRecipe
    from depthcut.healing.trainer import heal
    from depthcut.sweep.results import ResultsLog

    log = sweep_folder / "kd.jsonl"
    done = {json.loads(line)["key"] for line in log.read_text().splitlines()} if log.is_file() else set()
    teacher, tokenizer, _ = depthcut.load_model(args.model, dtype=args.dtype)
    data = load_texts(str(fit_data))
    recipe = HealRecipe(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=args.warmup,
                        objective="kd", heldout_windows=8)
    plain = [p for p in ResultsLog(sweep_folder).points().values() if p["drop"] and not p["healed"]
             and not p.get("repair")]
    for point in sorted(plain, key=lambda p: (p["strategy"], p["drop"])):
        key = f"{point['strategy']}/{point['drop']}/kd"
        if key in done:
            continue
        began = time.perf_counter()
        student = copy.deepcopy(teacher)
        depthcut.prune(student, point["removed_layers"])
        result = heal(student, tokenizer, data, recipe, teacher=teacher, progress=False)
        seconds = time.perf_counter() - began
        measured = evaluate(result.model, tokenizer, args.tasks.split(","), loss_data=str(heldout),
                            loss_samples=args.loss_samples, loss_seq_len=args.seq_len, limit=args.limit,
                            batch_size=32, progress=False)
        record = {"key": key, "strategy": point["strategy"], "drop": point["drop"], "fraction": point["fraction"],
                  "loss": measured.get("loss"), "tasks": measured.get("tasks"), "seconds": seconds,
                  "kl_before": result.kl_before, "kl_after": result.kl_after}
        with log.open("a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
        print(f"{key}: loss {record['loss']['loss']:.4f}, {seconds:.0f} s", file=sys.stderr)
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def table(sweep_folder: Path, kd: list[dict], tasks: list[str]) -> list[str]:
    from depthcut.sweep.report import gap_closed
    from depthcut.sweep.results import ResultsLog, configuration, task_accuracy

    points = list(ResultsLog(sweep_folder).points().values())
    base = next(p for p in points if p["drop"] == 0)
    names = {("none", False): "none", ("lstsq", False): "lstsq", ("cosine", False): "cosine",
             ("magnitude", False): "magnitude", ("none", True): "LoRA", ("lstsq", True): "lstsq+LoRA"}
    rows = []
    for point in points + [{**p, "healed": True, "repair": "kd"} for p in kd]:
        if not point["drop"]:
            continue
        strategy, repair, healed = configuration(point)
        name = "KD" if repair == "kd" else names.get((repair, healed))
        if name is None:
            continue
        plain = next(p for p in points if p["drop"] == point["drop"] and configuration(p) == (strategy, "none", False))
        seconds = point.get("seconds") if name == "KD" else (point.get("repair_fit") or {}).get("seconds", 0) + (
            point.get("heal") or {}).get("seconds", 0)
        accuracies = [task_accuracy(point, t)[0] for t in tasks]
        rows.append((strategy, point["drop"], name, point["loss"]["loss"], gap_closed(point, plain, base),
                     accuracies, seconds))
    order = ["none", "lstsq", "cosine", "magnitude", "LoRA", "KD", "lstsq+LoRA"]
    rows.sort(key=lambda r: (r[0], r[1], order.index(r[2])))
    base_acc = " ".join(f"{task_accuracy(base, t)[0]:.4f}" for t in tasks)
    lines = [f"unpruned: loss {base['loss']['loss']:.4f}, {' '.join(tasks)} {base_acc}",
             f"{'strategy':9} {'drop':>4} {'method':11} {'loss':>7} {'gap closed':>10} "
             + " ".join(f"{t:>9}" for t in tasks) + "  seconds"]
    for strategy, drop, name, loss, gap, accuracies, seconds in rows:
        closed = "-" if gap is None or name == "none" else f"{100 * gap:.0f}%"
        lines.append(f"{strategy:9} {drop:>4} {name:11} {loss:7.4f} {closed:>10} "
                     + " ".join(f"{a:9.4f}" if a is not None else f"{'-':>9}" for a in accuracies)
                     + f"  {seconds or 0:7.1f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--drop", default="0,4,8,12")
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: the full sets)")
    parser.add_argument("--steps", type=int, default=50, help="LoRA and KD steps")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--samples", type=int, default=64, help="calibration windows for analysis and repairs")
    parser.add_argument("--loss-samples", type=int, default=64)
    args = parser.parse_args(argv)

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
    sweep_folder = args.out / "sweep"
    sweep_to(model=args.model, dtype=args.dtype, out=str(sweep_folder), drop=args.drop,
             strategies=("angular", "deepest"), repair=tuple(repairs),
             data=str(fit_data), samples=args.samples, seq_len=args.seq_len, tasks=tuple(args.tasks.split(",")),
             limit=args.limit, loss=str(heldout), loss_samples=args.loss_samples, loss_seq_len=args.seq_len,
             heal=True, heal_data=str(fit_data), heal_steps=args.steps, heal_seq_len=args.seq_len,
             heal_batch_size=args.batch_size, heal_warmup_steps=args.warmup, heal_heldout_windows=8, quiet=True)
    kd = _kd_points(args, fit_data, heldout, sweep_folder)
    lines = table(sweep_folder, kd, args.tasks.split(",")) + refused
    facts = environment.record("cpu", args.dtype)
    lines.append(f"CPU capability {facts.get('cpu_capability')}, {facts.get('cpu')}")
    print("\n".join(lines))
    (args.out / "evidence.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

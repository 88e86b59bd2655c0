"""Compare `depthcut eval` with lm-evaluation-harness on the same model, documents and batch size.

depthcut scores multiple-choice benchmarks by log-likelihood the way lm-eval 0.4.x does; this
script checks that claim on real data. For SmolLM2-135M (float32 by default) it runs lm-eval's
own default task YAMLs on the local data (see ``lm_eval_local.py``) and ``depthcut.evaluation.
evaluate`` on the identical documents (a DEPTHCUT_DATA_DIR-style copy of them), zero-shot, and
prints per task and metric: both accuracies, their difference in points (target: at most
0.5) and how many documents the two tools predict differently.

Run from the repository root:  .venv/bin/python benchmarks/compare_lm_eval.py [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
import lm_eval_local  # noqa: E402

DEFAULT_TASKS = ["arc_easy", "piqa", "boolq"]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "compare_lm_eval.json"
TARGET_POINTS = 0.5  # |depthcut acc - lm-eval acc| must be at most this, in points
SHOWN_MISMATCHES = 20  # mismatching documents kept in the JSON per task and metric


def run_depthcut(model, tokenizer, tasks: list[str], data_dir: Path, batch_size: int) -> dict:
    """depthcut's evaluate() on the copied subset: {task: {"summary", "docs" by doc_id}}."""
    from depthcut.evaluation import evaluate

    os.environ["DEPTHCUT_DATA_DIR"] = str(data_dir)
    result = evaluate(model, tokenizer, tasks, num_fewshot=0, batch_size=batch_size, log_samples=True)
    return {
        name: {"summary": result["tasks"][name],
               "docs": {s["doc_id"]: s for s in result["samples"] if s["task"] == name}}
        for name in tasks
    }


def mismatches(ours: dict, theirs: list[dict], key: str, indices: list[int]) -> list[dict]:
    """Documents whose `key` prediction differs, with both tools' log-likelihoods."""
    return [
        {"doc_id": doc["doc_id"], "source_index": indices[doc["doc_id"]], "gold": doc["gold"],
         "depthcut": ours[doc["doc_id"]][key], "lm_eval": doc[key],
         "depthcut_loglikelihoods": ours[doc["doc_id"]]["loglikelihoods"],
         "lm_eval_loglikelihoods": doc["loglikelihoods"]}
        for doc in theirs
        if ours[doc["doc_id"]][key] != doc[key]
    ]


def max_loglikelihood_gap(ours: dict, theirs: list[dict]) -> float:
    """Largest |difference| between the two tools' log-likelihood of any choice of any document."""
    return max(
        (abs(a - b) for doc in theirs for a, b in zip(ours[doc["doc_id"]]["loglikelihoods"], doc["loglikelihoods"])),
        default=0.0,
    )


def compare_task(name: str, ours: dict, theirs: dict, indices: list[int]) -> list[dict]:
    """One row per metric lm-eval reports for the task (acc, and acc_norm where it has one)."""
    if len(ours["docs"]) != len(theirs["docs"]):
        raise RuntimeError(f"{name}: depthcut scored {len(ours['docs'])} documents, lm-eval {len(theirs['docs'])}")
    gap = max_loglikelihood_gap(ours["docs"], theirs["docs"])
    rows = []
    for metric, key in (("acc", "prediction"), ("acc_norm", "prediction_norm")):
        if theirs[metric] is None:
            continue
        differing = mismatches(ours["docs"], theirs["docs"], key, indices)
        points = 100 * (ours["summary"][metric] - theirs[metric])
        rows.append({
            "task": name, "metric": metric, "num_docs": len(theirs["docs"]),
            "depthcut": ours["summary"][metric], "lm_eval": theirs[metric], "difference_points": points,
            "pass": abs(points) <= TARGET_POINTS, "mismatching_docs": len(differing),
            "max_loglikelihood_gap": gap, "mismatches": differing[:SHOWN_MISMATCHES],
        })
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'task':<14} {'metric':<8} {'docs':>5} | {'depthcut':>8} {'lm-eval':>8} {'diff pts':>8} "
              f"{f'(<={TARGET_POINTS})':>8} | {'differing':>9} {'max |dLL|':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['task']:<14} {row['metric']:<8} {row['num_docs']:>5} | {100 * row['depthcut']:>8.2f} "
            f"{100 * row['lm_eval']:>8.2f} {row['difference_points']:>+8.2f} {'PASS' if row['pass'] else 'FAIL':>8} | "
            f"{row['mismatching_docs']:>9} {row['max_loglikelihood_gap']:>9.2e}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Load the model once, write the subsets, run both tools and compare them document by document."""
    import depthcut

    model, tokenizer, source = depthcut.load_model(args.model, dtype=args.dtype, device="cpu")
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="depthcut-compare-") as tmp:
        folder = Path(tmp)
        indices = {name: lm_eval_local.write_task(name, folder, limit=args.limit) for name in args.tasks}
        start = time.perf_counter()
        theirs = lm_eval_local.run_lm_eval(model, tokenizer, args.tasks, folder, args.batch_size)
        seconds["lm_eval"] = time.perf_counter() - start
        start = time.perf_counter()
        ours = run_depthcut(model, tokenizer, args.tasks, folder / "data", args.batch_size)
        seconds["depthcut"] = time.perf_counter() - start
    rows = [row for name in args.tasks for row in compare_task(name, ours[name], theirs[name], indices[name])]
    return {
        "config": {"model": args.model, "dtype": args.dtype, "tasks": args.tasks, "limit": args.limit,
                   "batch_size": args.batch_size, "num_fewshot": 0, "target_points": TARGET_POINTS,
                   "data": str(lm_eval_local.DATA_DIR), "model_source": source.as_dict()},
        "environment": environment.record(model.device, args.dtype),
        "seconds": seconds,
        "results": rows,
        "table": format_table(rows),
    }


def task_list(text: str) -> list[str]:
    """Parse "arc_easy,piqa" (a leading "+" adds to the default tasks: "+hellaswag")."""
    names = [part.strip() for part in text.lstrip("+").split(",") if part.strip()]
    unknown = sorted(set(names) - set(lm_eval_local.TASKS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown}; known: {', '.join(lm_eval_local.TASKS)}")
    return list(dict.fromkeys((DEFAULT_TASKS if text.startswith("+") else []) + names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="MODEL as depthcut.load_model takes it")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tasks", type=task_list, default=DEFAULT_TASKS,
                        help=f"comma-separated, from {', '.join(lm_eval_local.TASKS)}; '+name' adds to the default")
    parser.add_argument("--limit", type=int, default=None, help="the first N documents of each task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    results = run(args)
    results["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print()
    print(results["table"])
    print(f"\nlm-eval {results['seconds']['lm_eval']:.0f} s, depthcut {results['seconds']['depthcut']:.0f} s "
          f"(batch size {args.batch_size}, {args.dtype})")
    print(environment.describe(results["environment"]))
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()

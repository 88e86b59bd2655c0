"""Compare depthcut's lm-eval model with lm-eval's own `hf` model: same tasks, documents and model.

Both run through lm-eval's evaluator on the same task definitions (lm-eval's own, over depthcut's
local copy of the data) and the same documents (all, or a seeded random subset of `--limit`),
zero-shot, with the same in-memory SmolLM2-135M (float32 by default): ``HFLM`` and
``DepthcutLM`` (depthcut.evaluation.lm). Printed per task and metric: both accuracies, their
difference in points (target: 0), how many documents the two models answer differently and the
largest difference between their log-likelihoods of any choice. A differing answer can only come
from two choices tied within that difference.

Run from the repository root:  .venv/bin/python benchmarks/compare_lm_eval.py [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment

DEFAULT_TASKS = ["arc_easy", "piqa", "boolq"]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "compare_lm_eval.json"
SHOWN_MISMATCHES = 20  # mismatching documents kept in the JSON per task and metric


def run_model(lm, tasks: list[str], limit: int | None, seed: int) -> tuple[dict, dict]:
    """(summaries by task, documents by (task, doc_id)) of one lm-eval model on the tasks."""
    from depthcut.evaluation.evaluate import run_tasks
    from depthcut.evaluation.tasks import resolve_tasks

    summaries, docs = run_tasks(lm, resolve_tasks(tasks), limit=limit, num_fewshot=0, seed=seed, log_samples=True,
                                progress=True)
    return summaries, {(d["task"], d["doc_id"]): d for d in docs}


def compare_task(name: str, ours: tuple[dict, dict], theirs: tuple[dict, dict]) -> list[dict]:
    """One row per accuracy metric of the task (acc, and acc_norm where lm-eval reports it)."""
    our_docs = {key: d for key, d in ours[1].items() if key[0] == name}
    their_docs = {key: d for key, d in theirs[1].items() if key[0] == name}
    if our_docs.keys() != their_docs.keys():
        raise RuntimeError(f"{name}: the two models answered different documents")
    gap = max(abs(a - b) for key, d in their_docs.items()
              for a, b in zip(our_docs[key]["loglikelihoods"], d["loglikelihoods"]))
    rows = []
    for metric, key in (("acc", "prediction"), ("acc_norm", "prediction_norm")):
        if metric not in theirs[0][name]:
            continue
        differing = [{"doc_id": doc_id, "source_line": d.get("source_line"), "gold": d["gold"],
                      "depthcut": our_docs[doc_key][key], "hf": d[key],
                      "depthcut_loglikelihoods": our_docs[doc_key]["loglikelihoods"],
                      "hf_loglikelihoods": d["loglikelihoods"]}
                     for doc_key, d in their_docs.items() for doc_id in [doc_key[1]] if our_docs[doc_key][key] != d[key]]
        rows.append({
            "task": name, "metric": metric, "num_docs": len(their_docs), "depthcut": ours[0][name][metric],
            "hf": theirs[0][name][metric], "difference_points": 100 * (ours[0][name][metric] - theirs[0][name][metric]),
            "mismatching_docs": len(differing), "max_loglikelihood_gap": gap, "mismatches": differing[:SHOWN_MISMATCHES],
        })
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'task':<14} {'metric':<8} {'docs':>5} | {'depthcut':>8} {'hf':>8} {'diff pts':>8} | "
              f"{'differing':>9} {'max |dLL|':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['task']:<14} {row['metric']:<8} {row['num_docs']:>5} | {100 * row['depthcut']:>8.2f} "
                     f"{100 * row['hf']:>8.2f} {row['difference_points']:>+8.2f} | {row['mismatching_docs']:>9} "
                     f"{row['max_loglikelihood_gap']:>9.2e}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Load the model once, run both lm-eval models and compare them document by document."""
    from lm_eval.models.huggingface import HFLM

    import depthcut
    from depthcut.evaluation.lm import DepthcutLM

    model, tokenizer, source = depthcut.load_model(args.model, dtype=args.dtype, device=args.device)
    seconds, outputs = {}, {}
    for name, lm in (("hf", HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.hf_batch_size)),
                     ("depthcut", DepthcutLM(model, tokenizer, batch_size=args.batch_size))):
        start = time.perf_counter()
        outputs[name] = run_model(lm, args.tasks, args.limit, args.seed)
        seconds[name] = time.perf_counter() - start
    rows = [row for name in args.tasks for row in compare_task(name, outputs["depthcut"], outputs["hf"])]
    return {
        "config": {"model": args.model, "dtype": args.dtype, "tasks": args.tasks, "limit": args.limit,
                   "seed": args.seed, "batch_size": args.batch_size, "hf_batch_size": args.hf_batch_size,
                   "num_fewshot": 0, "model_source": source.as_dict()},
        "environment": environment.record(model.device, args.dtype),
        "seconds": seconds,
        "results": rows,
        "table": format_table(rows),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="MODEL as depthcut.load_model takes it")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tasks", type=lambda text: text.split(","), default=DEFAULT_TASKS,
                        help="comma-separated lm-eval task names (default: arc_easy,piqa,boolq)")
    parser.add_argument("--limit", type=int, default=None, help="a seeded random subset of N documents per task "
                                                                "(default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset")
    parser.add_argument("--batch-size", type=int, default=16, help="DepthcutLM's: distinct contexts per forward pass")
    parser.add_argument("--hf-batch-size", type=int, default=32, help="HFLM's: sequences per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
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
    print(f"\nhf {results['seconds']['hf']:.0f} s, depthcut {results['seconds']['depthcut']:.0f} s "
          f"(batch sizes {args.hf_batch_size} / {args.batch_size}, {args.dtype})")
    print(environment.describe(results["environment"]))
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()

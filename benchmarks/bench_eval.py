"""Benchmark: items/s of depthcut's lm-eval model (`DepthcutLM`) versus lm-eval's own `hf` model (HFLM).

Both models answer the very same lm-eval requests: the `Instance`s lm-eval builds from its own
task definitions over depthcut's local copy of the data (a seeded random subset of `--limit`
documents per task, zero-shot), with the same in-memory model and dtype:

- ``hf``: ``HFLM.loglikelihood`` (one padded sequence per choice);
- ``depthcut``: ``DepthcutLM(scoring="packed").loglikelihood`` (the default: each context and all
  its choices in one masked row);
- ``depthcut_full``: ``DepthcutLM(scoring="full")`` (one sequence per choice, as HFLM).

The batch size means different things (HFLM: sequences per forward pass; DepthcutLM: distinct
contexts, each with all its choices), so every variant runs at each of `--batch-sizes` and its
best counts. Only the `loglikelihood` call is timed (tokenization included; building the
requests not). Rounds are interleaved (every variant and batch size per task, `--repeats`
times) so that a slow phase of a shared machine hits all of them. Throughput is documents per
second. Per document, the answers (acc and acc_norm predictions) and log-likelihoods are compared
with HFLM's at its first batch size.

Run from the repository root:  .venv/bin/python benchmarks/bench_eval.py
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

VARIANTS = ("hf", "depthcut", "depthcut_full")
DEFAULT_TASKS = ["arc_easy", "hellaswag"]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_eval.json"
RATIO_TARGET = 1.5  # depthcut items/s / HFLM items/s (each at its best batch size) must be at least this


def task_requests(name: str, limit: int | None, seed: int):
    """lm-eval's requests for task `name` (zero-shot, a seeded subset), sorted by document and
    choice, and a function turning their log-likelihoods into per-document answers."""
    from depthcut.evaluation.evaluate import subsets
    from depthcut.evaluation.tasks import get_task, load_task

    task = load_task(get_task(name))["tasks"][name]
    task.set_config(key="num_fewshot", value=0)
    ids = (subsets({name: task}, limit, seed) or {}).get(name)
    task.build_all_requests(samples=ids, rank=0, world_size=1)
    instances = sorted(task.instances, key=lambda r: (r.doc_id, r.idx))
    docs = dict(task.doc_iterator(samples=ids))
    lengths = {doc_id: [max(len(c), 1) for c in task.doc_to_choice(doc)] for doc_id, doc in docs.items()}

    def answers(scores) -> list[tuple]:
        by_doc: dict[int, list[float]] = {}
        for request, (loglikelihood, _) in zip(instances, scores):
            by_doc.setdefault(request.doc_id, []).append(loglikelihood)
        out = []
        for doc_id, lls in sorted(by_doc.items()):
            order = range(len(lls))
            out.append((lls, max(order, key=lls.__getitem__),
                        max(order, key=lambda i: lls[i] / lengths[doc_id][i])))
        return out

    return instances, answers, len(docs)


def build_models(model, tokenizer, batch_sizes: list[int], variants: list[str]) -> dict:
    """{(variant, batch size): lm-eval model} for every variant at every batch size."""
    from lm_eval.models.huggingface import HFLM

    from depthcut.evaluation.lm import DepthcutLM

    makers = {"hf": lambda size: HFLM(pretrained=model, tokenizer=tokenizer, batch_size=size),
              "depthcut": lambda size: DepthcutLM(model, tokenizer, batch_size=size, scoring="packed", progress=False),
              "depthcut_full": lambda size: DepthcutLM(model, tokenizer, batch_size=size, scoring="full",
                                                       progress=False)}
    return {(variant, size): makers[variant](size) for size in batch_sizes for variant in variants}


def measure(models: dict, tasks: dict, repeats: int) -> dict:
    """{task: {(variant, size): {"seconds": [...], "answers": [...]}}}, interleaved rounds."""
    runs = {name: {key: {"seconds": []} for key in models} for name in tasks}
    for repeat in range(repeats):
        for name, (instances, answers, docs) in tasks.items():
            for key, lm in models.items():
                start = time.perf_counter()
                scores = lm.loglikelihood(instances, disable_tqdm=True)
                seconds = time.perf_counter() - start
                runs[name][key]["seconds"].append(seconds)
                runs[name][key]["answers"] = answers(scores)
                print(f"  round {repeat + 1}  {name:<10} {key[0]:<14} batch {key[1]:<3} {docs / seconds:7.2f} items/s",
                      flush=True)
    return runs


def summarise(name: str, runs: dict, docs: int, batch_sizes: list[int], variants: list[str]) -> dict:
    """Per variant: best items/s over batch sizes (and each size's), ratios to HFLM, and how far the
    answers and log-likelihoods are from HFLM's, document by document."""
    reference = runs["hf", batch_sizes[0]]["answers"]
    row: dict = {"task": name, "docs": docs}
    for variant in variants:
        per_size = {size: docs / min(runs[variant, size]["seconds"]) for size in batch_sizes}
        best = max(per_size, key=per_size.get)
        pairs = list(zip(runs[variant, best]["answers"], reference))
        if len(pairs) != len(reference):
            raise RuntimeError(f"{name}: {variant} answered {len(pairs)} documents, HFLM {len(reference)}")
        row[variant] = {
            "items_per_s": per_size[best], "best_batch_size": best, "items_per_s_by_batch_size": per_size,
            "seconds": {size: runs[variant, size]["seconds"] for size in batch_sizes},
            "acc_mismatches": sum(a[1] != b[1] for a, b in pairs),
            "acc_norm_mismatches": sum(a[2] != b[2] for a, b in pairs),
            "max_loglikelihood_gap": max(abs(x - y) for a, b in pairs for x, y in zip(a[0], b[0])),
        }
    for variant in variants[1:]:
        row[f"{variant}_ratio"] = row[variant]["items_per_s"] / row["hf"]["items_per_s"]
    row["pass"] = row["depthcut_ratio"] >= RATIO_TARGET
    return row


def format_table(rows: list[dict]) -> str:
    header = (f"{'task':<10} {'docs':>5} | {'hf':>12} {'depthcut':>12} {'dc full':>12} | {'ratio':>6} "
              f"{f'(>={RATIO_TARGET})':>8} {'full':>5} | {'differing acc/acc_norm':>22} {'full':>7} | "
              f"{'max |dLL|':>9} {'full':>8}")
    lines = [header, "-" * len(header)]
    missing = {"items_per_s": float("nan"), "best_batch_size": "-", "acc_mismatches": "-", "acc_norm_mismatches": "-",
               "max_loglikelihood_gap": float("nan")}  # a variant not run (--variants)
    for row in rows:
        hf, packed, full = (row.get(v, missing) for v in VARIANTS)
        cells = [f"{v['items_per_s']:7.2f} (b{v['best_batch_size']})" for v in (hf, packed, full)]
        differing = [f"{v['acc_mismatches']}/{v['acc_norm_mismatches']}" for v in (packed, full)]
        lines.append(
            f"{row['task']:<10} {row['docs']:>5} | {cells[0]:>12} {cells[1]:>12} {cells[2]:>12} | "
            f"{row['depthcut_ratio']:>6.2f} {'PASS' if row['pass'] else 'FAIL':>8} "
            f"{row.get('depthcut_full_ratio', float('nan')):>5.2f} | {differing[0]:>22} {differing[1]:>7} | "
            f"{packed['max_loglikelihood_gap']:>9.2e} {full['max_loglikelihood_gap']:>8.2e}"
        )
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Load the model, build every task's requests and every model, measure, summarise."""
    import torch

    import depthcut

    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    model, tokenizer, source = depthcut.load_model(args.model, dtype=args.dtype, device=args.device)
    tasks = {name: task_requests(name, args.limit, args.seed) for name in args.tasks}
    models = build_models(model, tokenizer, args.batch_sizes, args.variants)
    print(f"measuring {', '.join(args.variants)} at batch sizes {args.batch_sizes} on {', '.join(args.tasks)}; "
          f"{args.repeats} rounds", flush=True)
    runs = measure(models, tasks, args.repeats)
    rows = [summarise(name, runs[name], tasks[name][2], args.batch_sizes, args.variants) for name in args.tasks]
    return {
        "config": {"model": args.model, "dtype": args.dtype, "device": str(model.device), "tasks": args.tasks,
                   "limit": args.limit, "seed": args.seed, "batch_sizes": args.batch_sizes, "variants": args.variants, "repeats": args.repeats,
                   "threads": args.threads, "num_fewshot": 0, "ratio_target": RATIO_TARGET,
                   "model_source": source.as_dict()},
        "environment": {**environment.record(model.device, args.dtype), "load_average_before": load_before,
                        "load_average_after": os.getloadavg()},
        "results": rows,
        "table": format_table(rows),
        "wall_seconds": time.perf_counter() - started,
    }


def variant_list(text: str) -> list[str]:
    asked = {v.strip() for v in text.split(",")} | {"hf", "depthcut"}
    if asked - set(VARIANTS):
        raise argparse.ArgumentTypeError(f"unknown variants {sorted(asked - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
    return [v for v in VARIANTS if v in asked]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="MODEL as depthcut.load_model takes it")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tasks", type=lambda text: text.split(","), default=DEFAULT_TASKS,
                        help="comma-separated lm-eval task names (default: arc_easy,hellaswag)")
    parser.add_argument("--limit", type=int, default=300, help="a seeded random subset of N documents per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset")
    parser.add_argument("--batch-sizes", type=lambda text: [int(x) for x in text.split(",")], default=[8, 32],
                        help="every variant runs at each; its best counts (default: 8,32)")
    parser.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                        help=f"which to time, from {', '.join(VARIANTS)} (hf and depthcut always; default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (every variant scores on it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    results = run_benchmark(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    env = results["environment"]
    print()
    print(results["table"])
    print(f"\nitems/s: documents per second, fastest of {args.repeats} rounds at the best batch size (bN); "
          f"ratio: depthcut / hf ({args.dtype}, {env['threads']} threads)")
    print(environment.describe(env))
    print(f"load average before {env['load_average_before'][0]:.2f}, after "
          f"{env['load_average_after'][0]:.2f} on {env['cpu_count']} CPUs")
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()

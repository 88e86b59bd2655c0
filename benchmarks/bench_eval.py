"""Benchmark: throughput of depthcut's multiple-choice scorer versus lm-evaluation-harness's HFLM.

Both tools score the same documents (the first `--limit` of ARC-Easy and HellaSwag by default)
with the same in-memory model, dtype and batch size, zero-shot:

- ``lm_eval``: ``HFLM.loglikelihood`` on the requests lm-eval's own task builds from its default
  task YAML (the dataset replaced by the local copy, see ``lm_eval_local.py``);
- ``depthcut``: ``Scorer(mode="packed").loglikelihoods`` (the default) on the items depthcut's task
  builds from an identical copy of those documents (each context and all its choices in one row);
- ``depthcut_full``: the same with ``mode="full"`` (one sequence per choice, as lm-eval does).

Only the scoring call is timed (tokenization included, task and data loading not). The runs are
interleaved (lm_eval, depthcut, depthcut_full per task, `--repeats` rounds) and the fastest of
each is kept, so a slow phase of a shared machine hits all of them. Throughput is documents
(questions) per second. The script also checks, document by document, whether both tools pick
the same answer (acc and acc_norm predictions), which also shows that they scored the same thing.

Run from the repository root:  .venv/bin/python benchmarks/bench_eval.py
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

VARIANTS = ("lm_eval", "depthcut", "depthcut_full")
DEFAULT_TASKS = ["arc_easy", "hellaswag"]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_eval.json"
RATIO_TARGET = 1.5  # depthcut items/s / lm-eval items/s must be at least this


def lm_eval_scorer(lm, folder: Path, name: str):
    """A function scoring task `name` with lm-eval: per document (log-likelihoods, prediction, prediction_norm)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict([name], TaskManager(include_path=str(folder / "lm_eval"), include_defaults=False))[name]
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(rank=0, world_size=1)
    instances = sorted(task.instances, key=lambda r: (r.doc_id, r.idx))
    delimiter = task.config.target_delimiter

    def run() -> list[tuple]:
        scores = lm.loglikelihood(instances, disable_tqdm=True)
        docs: dict[int, tuple[list, list]] = {}
        for request, (loglikelihood, _) in zip(instances, scores):
            lls, continuations = docs.setdefault(request.doc_id, ([], []))
            lls.append(loglikelihood)
            continuations.append(request.args[1])
        return [(lls, *lm_eval_local.predictions(lls, conts, delimiter)) for _, (lls, conts) in sorted(docs.items())]

    return run, len({r.doc_id for r in instances})


def depthcut_scorer(model, tokenizer, name: str, batch_size: int, mode: str):
    """A function scoring task `name` with depthcut's Scorer, returning what `lm_eval_scorer`'s does."""
    from depthcut.evaluation.metrics import item_outcomes
    from depthcut.evaluation.scoring import Scorer
    from depthcut.evaluation.tasks import get_task, load_items

    items, _ = load_items(get_task(name), num_fewshot=0)
    requests = [pair for item in items for pair in item.requests()]
    scorer = Scorer(model, tokenizer, batch_size=batch_size, mode=mode)

    def run() -> list[tuple]:
        scores, start, out = scorer.loglikelihoods(requests), 0, []
        for item in items:
            lls = scores[start : start + item.num_choices]
            start += item.num_choices
            outcome = item_outcomes(item, lls)
            out.append((lls, outcome["prediction"], outcome["prediction_norm"]))
        return out

    return run, len(items)


def build_scorers(model, tokenizer, folder: Path, tasks: list[str], batch_size: int) -> dict:
    """{task: {variant: (run, number of documents)}}, every variant on the documents in `folder`."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    os.environ["DEPTHCUT_DATA_DIR"] = str(folder / "data")
    return {
        name: {
            "lm_eval": lm_eval_scorer(lm, folder, name),
            "depthcut": depthcut_scorer(model, tokenizer, name, batch_size, "packed"),
            "depthcut_full": depthcut_scorer(model, tokenizer, name, batch_size, "full"),
        }
        for name in tasks
    }


def measure(scorers: dict, repeats: int) -> dict:
    """Time every variant of every task `repeats` times, interleaved; keep all times and the predictions."""
    runs = {name: {variant: {"seconds": []} for variant in VARIANTS} for name in scorers}
    for repeat in range(repeats):
        for name, variants in scorers.items():
            for variant in VARIANTS:
                run, docs = variants[variant]
                start = time.perf_counter()
                predicted = run()
                seconds = time.perf_counter() - start
                runs[name][variant]["seconds"].append(seconds)
                runs[name][variant]["predictions"] = predicted
                print(f"  round {repeat + 1}  {name:<10} {variant:<14} {docs / seconds:7.2f} items/s", flush=True)
    return runs


def summarise(name: str, runs: dict, docs: int) -> dict:
    """Best items/s per variant, ratios to lm-eval, and how far each variant's answers and
    log-likelihoods are from lm-eval's, document by document."""
    reference = runs["lm_eval"]["predictions"]
    if any(len(runs[variant]["predictions"]) != len(reference) for variant in VARIANTS):
        raise RuntimeError(f"{name}: the tools scored different numbers of documents")
    row: dict = {"task": name, "docs": docs}
    for variant in VARIANTS:
        pairs = list(zip(runs[variant]["predictions"], reference))
        row[variant] = {
            "items_per_s": docs / min(runs[variant]["seconds"]),
            "seconds": runs[variant]["seconds"],
            "acc_mismatches": sum(a[1] != b[1] for a, b in pairs),
            "acc_norm_mismatches": sum(a[2] != b[2] for a, b in pairs),
            "max_loglikelihood_gap": max(abs(x - y) for a, b in pairs for x, y in zip(a[0], b[0])),
        }
    for variant in VARIANTS[1:]:
        row[f"{variant}_ratio"] = row[variant]["items_per_s"] / row["lm_eval"]["items_per_s"]
    row["pass"] = row["depthcut_ratio"] >= RATIO_TARGET
    return row


def format_table(rows: list[dict]) -> str:
    header = (f"{'task':<10} {'docs':>5} | {'lm-eval':>8} {'depthcut':>8} {'dc full':>8} | {'ratio':>6} "
              f"{f'(>={RATIO_TARGET})':>8} {'full':>5} | {'differing acc/acc_norm':>22} {'full':>7} | "
              f"{'max |dLL|':>9} {'full':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        packed, full = row["depthcut"], row["depthcut_full"]
        differing = [f"{v['acc_mismatches']}/{v['acc_norm_mismatches']}" for v in (packed, full)]
        lines.append(
            f"{row['task']:<10} {row['docs']:>5} | {row['lm_eval']['items_per_s']:>8.2f} {packed['items_per_s']:>8.2f} "
            f"{full['items_per_s']:>8.2f} | {row['depthcut_ratio']:>6.2f} {'PASS' if row['pass'] else 'FAIL':>8} "
            f"{row['depthcut_full_ratio']:>5.2f} | {differing[0]:>22} {differing[1]:>7} | "
            f"{packed['max_loglikelihood_gap']:>9.2e} {full['max_loglikelihood_gap']:>8.2e}"
        )
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Load the model, write the subsets, build every scorer, measure, summarise."""
    import torch

    import depthcut

    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    model, tokenizer, source = depthcut.load_model(args.model, dtype=args.dtype, device=args.device)
    with tempfile.TemporaryDirectory(prefix="depthcut-bench-eval-") as tmp:
        folder = Path(tmp)
        for name in args.tasks:
            lm_eval_local.write_task(name, folder, limit=args.limit)
        scorers = build_scorers(model, tokenizer, folder, args.tasks, args.batch_size)
        print(f"measuring {', '.join(VARIANTS)} on {', '.join(args.tasks)}; {args.repeats} rounds", flush=True)
        runs = measure(scorers, args.repeats)
    rows = [summarise(name, runs[name], scorers[name]["lm_eval"][1]) for name in args.tasks]
    return {
        "config": {"model": args.model, "dtype": args.dtype, "device": str(model.device), "tasks": args.tasks,
                   "limit": args.limit,
                   "batch_size": args.batch_size, "repeats": args.repeats, "threads": args.threads,
                   "num_fewshot": 0, "ratio_target": RATIO_TARGET, "model_source": source.as_dict()},
        "environment": {**environment.record(model.device, args.dtype), "load_average_before": load_before,
                        "load_average_after": os.getloadavg()},
        "results": rows,
        "table": format_table(rows),
        "wall_seconds": time.perf_counter() - started,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="MODEL as depthcut.load_model takes it")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tasks", type=lambda text: text.split(","), default=DEFAULT_TASKS,
                        help=f"comma-separated, from {', '.join(lm_eval_local.TASKS)}")
    parser.add_argument("--limit", type=int, default=300, help="the first N documents of each task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both tools score on it)")
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
    print(f"\nitems/s: documents per second, fastest of {args.repeats}; ratio: depthcut / lm-eval "
          f"(batch size {args.batch_size}, {args.dtype}, {env['threads']} threads)")
    print(environment.describe(env))
    print(f"load average before {env['load_average_before'][0]:.2f}, after "
          f"{env['load_average_after'][0]:.2f} on {env['cpu_count']} CPUs")
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()

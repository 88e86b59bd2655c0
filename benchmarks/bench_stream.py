"""Benchmark: peak memory and time of the layer-streamed analysis versus the in-memory analysis.

Both analyze the same checkpoint (SmolLM2-135M saved as safetensors, float32 by default) on the
same calibration samples with the same metrics and batch size:

- ``memory``: ``depthcut.load_model(folder)`` then ``depthcut.analyze(...)``: the whole model resident;
- ``stream``: ``depthcut.analyze_streamed(folder, ...)``: one decoder layer computing at a time while
  the next is read, the all-token states spilled to a file.

Each run is a fresh subprocess (this script with ``--worker``): on Linux a child's ``ru_maxrss``
starts from its parent's peak, so the parent only orchestrates, and the checkpoint is written by
a ``prepare`` subprocess. A worker imports torch, transformers, depthcut and the architecture's modeling code, loads the
tokenizer and builds the calibration set, records its RSS (the baseline: interpreter, libraries,
tokenizer and samples, no model), runs the analysis on that set and reports its peak RSS.
The variants alternate for ``--repeats`` rounds; the smallest peak and the fastest time of each
count. Each run also reports its CPU time (user + system, all threads): on a shared machine the
wall time moves with the load, the CPU time much less. The script also checks that both give the
same distance matrices, and computes the bound the streamed peak should stay under: two decoder
layers (the one computing and the next, read meanwhile) + the embeddings + the activations (every
sample's hidden state and last-token state in the model's dtype, the spilled states waiting for
the writer thread, two read-back chunks of the spilled states and the cosines of one).

Run from the repository root:  .venv/bin/python benchmarks/bench_stream.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402  (standard library only until record() is called)

DATA_DIR = Path(os.environ.get("DEPTHCUT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
C4_SAMPLE = DATA_DIR / "c4" / "c4_validation_2k.jsonl"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "stream.json"
VARIANTS = ("memory", "stream")
TIME_TARGET = 1.5  # streamed time / in-memory time must be at most this
MIB = 1024 * 1024


def current_rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def prepare(args: argparse.Namespace) -> None:
    """Save the model as a safetensors folder (a worker of its own: its memory must not count)."""
    import depthcut

    model, tokenizer, _ = depthcut.load_model(args.model, dtype=args.dtype)
    model.save_pretrained(args.folder)
    tokenizer.save_pretrained(args.folder)


def worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

    import depthcut

    torch.set_num_threads(args.threads or torch.get_num_threads())
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    calibration = depthcut.build_calibration(tokenizer, depthcut.load_texts(str(C4_SAMPLE)), args.samples, args.seq_len)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(args.folder))]  # imports the modeling code
    baseline = current_rss()
    options = dict(data=calibration, batch_size=args.batch_size, progress=False)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if args.worker == "memory":
        model, _, _ = depthcut.load_model(str(args.folder), dtype=args.dtype, with_tokenizer=False)
        analysis = depthcut.analyze(model, tokenizer, **options)
    else:
        analysis = depthcut.analyze_streamed(args.folder, tokenizer, dtype=args.dtype, spill_dir=args.spill_dir,
                                             **options)
    seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"variant": args.worker, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "baseline_rss": baseline, "peak_rss": peak_rss(),
            "environment": environment.record("cpu", args.dtype, threads_asked=args.threads),
            "metrics": analysis.metrics, "streamed": analysis.metadata.get("streamed")}


def bound(folder: Path, samples: int, seq_len: int, batch_size: int) -> dict:
    """What the streamed peak above the baseline should stay under, from the checkpoint itself."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    layers, width = config["num_hidden_layers"], config["hidden_size"]
    per_layer: dict[int, int] = {}
    embeddings = 0
    with safe_open(folder / "model.safetensors", "pt") as handle:
        for name in handle.keys():
            info = handle.get_slice(name)
            size = 1
            for dim in info.get_shape():
                size *= dim
            nbytes = size * {"F32": 4, "BF16": 2, "F16": 2}[info.get_dtype()]
            if ".layers." in name:
                index = int(name.split(".layers.")[1].split(".")[0])
                per_layer[index] = per_layer.get(index, 0) + nbytes
            elif "embed" in name:
                embeddings += nbytes
    itemsize = 4 if config.get("dtype", config.get("torch_dtype")) == "float32" else 2
    from depthcut.analysis.spill import SPILL_QUEUE, chunk_tokens

    tokens = samples * seq_len
    chunk = chunk_tokens(layers + 1, width)
    activations = {
        "hidden_states": tokens * width * itemsize,
        "last_token_states": samples * (layers + 1) * width * itemsize,
        # gathered states of a batch at one position: one being written, SPILL_QUEUE waiting
        "spill_queue": (SPILL_QUEUE + 1) * batch_size * seq_len * width * itemsize,
        # the chunk whose cosines are taken (in the model's dtype, and upcast to float32) and the
        # next one being read, plus the chunk's cosines and their angles
        "read_back_chunks": 2 * chunk * (layers + 1) * width * itemsize
        + (chunk * (layers + 1) * width * 4 if itemsize != 4 else 0) + 2 * chunk * (layers + 1) ** 2 * 4,
        # one batch through one layer: attention scores and probabilities (float32 softmax),
        # q/k/v/output projections, and the MLP's gate, up, activation and product
        "one_layer_working_set": 2 * batch_size * config["num_attention_heads"] * seq_len**2 * 4
        + 4 * batch_size * seq_len * width * itemsize + 4 * batch_size * seq_len * config["intermediate_size"] * itemsize,
    }
    return {"largest_layer": max(per_layer.values()), "two_layers": 2 * max(per_layer.values()),
            "embeddings": embeddings, **activations,
            "total": 2 * max(per_layer.values()) + embeddings + sum(activations.values())}


def max_difference(a: dict, b: dict) -> float:
    def flat(value):
        if isinstance(value, list):
            for item in value:
                yield from flat(item)
        elif value is not None:
            yield value

    return max(abs(x - y) for name in a for x, y in zip(flat(a[name]), flat(b[name]), strict=True))


def run(args: argparse.Namespace) -> dict:
    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="depthcut-bench-stream-") as tmp:
        folder = Path(tmp) / "model"
        common = ["--model", args.model, "--dtype", args.dtype, "--samples", str(args.samples), "--seq-len",
                  str(args.seq_len), "--batch-size", str(args.batch_size), "--folder", str(folder),
                  "--spill-dir", tmp] + (["--threads", str(args.threads)] if args.threads else [])
        subprocess.run([sys.executable, __file__, "--worker", "prepare", *common], check=True)
        runs: dict[str, list] = {v: [] for v in VARIANTS}
        for round_index in range(args.repeats):
            for variant in VARIANTS:
                done = subprocess.run([sys.executable, __file__, "--worker", variant, *common], check=True,
                                      capture_output=True, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs[variant].append(result)
                print(f"  round {round_index + 1}  {variant:<7} {result['seconds']:7.1f} s  CPU "
                      f"{result['cpu_seconds']:7.1f} s  peak {result['peak_rss'] / MIB:7.0f} MiB  baseline "
                      f"{result['baseline_rss'] / MIB:5.0f} MiB  load {os.getloadavg()[0]:5.2f}", flush=True)
        expected = bound(folder, args.samples, args.seq_len, args.batch_size)
    best = {v: {"seconds": min(r["seconds"] for r in runs[v]), "cpu_seconds": min(r["cpu_seconds"] for r in runs[v]),
                "peak_rss": min(r["peak_rss"] for r in runs[v]),
                "added_rss": min(r["peak_rss"] - r["baseline_rss"] for r in runs[v]),
                "baseline_rss": min(r["baseline_rss"] for r in runs[v])} for v in VARIANTS}
    memory, stream = best["memory"], best["stream"]
    summary = {
        "peak_ratio": stream["peak_rss"] / memory["peak_rss"],
        "added_ratio": stream["added_rss"] / memory["added_rss"],
        "time_ratio": stream["seconds"] / memory["seconds"],
        # each round's stream / memory (run one after the other, so under about the same load)
        "time_ratio_per_round": [s["seconds"] / m["seconds"] for m, s in zip(runs["memory"], runs["stream"])],
        "cpu_time_ratio": stream["cpu_seconds"] / memory["cpu_seconds"],
        "bound_bytes": expected["total"],
        "within_bound": stream["added_rss"] <= expected["total"],
        "under_half": stream["added_rss"] <= 0.5 * memory["added_rss"],
        "max_metric_difference": max_difference(runs["memory"][0]["metrics"], runs["stream"][0]["metrics"]),
    }
    table = "\n".join([
        f"{'variant':<8} {'time s':>8} {'CPU s':>8} {'peak RSS MiB':>13} {'above baseline MiB':>19}",
        *(f"{v:<8} {best[v]['seconds']:>8.1f} {best[v]['cpu_seconds']:>8.1f} {best[v]['peak_rss'] / MIB:>13.0f} "
          f"{best[v]['added_rss'] / MIB:>19.0f}" for v in VARIANTS),
        f"stream / memory: peak {summary['peak_ratio']:.2f}, above baseline {summary['added_ratio']:.2f} "
        f"({'PASS' if summary['under_half'] else 'FAIL'} <= 0.5), time {summary['time_ratio']:.2f} "
        f"({'PASS' if summary['time_ratio'] <= TIME_TARGET else 'FAIL'} <= {TIME_TARGET}; per round "
        f"{', '.join(f'{r:.2f}' for r in summary['time_ratio_per_round'])}), CPU time {summary['cpu_time_ratio']:.2f}",
        f"bound (two layers + embeddings + activations): {expected['total'] / MIB:.0f} MiB, streamed above "
        f"baseline {stream['added_rss'] / MIB:.0f} MiB: {'PASS' if summary['within_bound'] else 'FAIL'}",
        f"largest |difference| between the two analyses' metrics: {summary['max_metric_difference']:.2e}",
    ])
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "folder", "out", "spill_dir")},
        "environment": {**runs["memory"][0]["environment"], "cpu_count": os.cpu_count(),
                        "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "runs": {v: [{k: r[k] for k in ("seconds", "cpu_seconds", "baseline_rss", "peak_rss", "streamed")}
                     for r in runs[v]]
                 for v in VARIANTS},
        "best": best, "bound": expected, "summary": summary, "table": table,
        "wall_seconds": time.perf_counter() - started,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each counts")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spill-dir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker == "prepare":
        prepare(args)
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print()
    print(result["table"])
    print(environment.describe(result["environment"]))
    print(f"load average before {result['environment']['load_average_before'][0]:.2f}, after "
          f"{result['environment']['load_average_after'][0]:.2f}; wrote {args.out} ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()

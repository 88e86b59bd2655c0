"""Benchmark: throughput and peak memory of depthcut's one-pass analysis versus a plain forward pass.

The question this answers: how much does `depthcut.analyze` cost on top of simply running the
model over the same calibration data? Three variants run on the same samples, batch size, dtype
and device:

- ``plain``: ``model(input_ids, attention_mask, use_cache=False)``, LM head included;
- ``decoder``: the base model without the LM head (``model.get_decoder()``), shown because the
  analysis stops after the last decoder layer and so skips the LM head too;
- ``analyze``: ``depthcut.analyze(...)`` with its default metrics, or those of ``--metrics``
  (``--metrics angular_last_token``: the paper's metric alone, no all-token states kept).

Every measurement runs in its own fresh subprocess (this script re-invoked with ``--worker``), so
the peak memory of one variant never includes what another one allocated. The parent process
imports only the standard library and leaves model loading to a ``prepare`` subprocess too: on
Linux a child's ru_maxrss starts from its parent's peak RSS (it is inherited through fork/exec),
so a parent that had loaded the model would inflate every worker's figure alike.

Variants are interleaved (plain, decoder, analyze, plain, decoder, analyze, ...) per batch size;
each process times a few full passes after a warm-up batch, and the fastest pass of all rounds
is kept. Slow phases of a shared, noisy machine then hit all variants alike, and the ratios come
from one run.

Run from the repository root:  .venv/bin/python benchmarks/bench_analysis.py
"""

from __future__ import annotations

import argparse
import gc
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

VARIANTS = ("plain", "decoder", "analyze")
# The reference data beside the project (../shared/data), or wherever DEPTHCUT_DATA_DIR points.
DATA_DIR = Path(os.environ.get("DEPTHCUT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
C4_SAMPLE = DATA_DIR / "c4" / "c4_validation_2k.jsonl"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "analysis.json"
THROUGHPUT_TARGET = 0.97  # analysis tok/s / plain tok/s must be at least this
MEMORY_TARGET = 1.10  # analysis peak memory / plain peak memory must be at most this
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Memory probes (used inside workers)
# ---------------------------------------------------------------------------------------------


def current_rss() -> int:
    """Resident set size of this process now, in bytes (the baseline the peak is compared to)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import psutil  # not Linux: no /proc, so ask psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def sync(device) -> None:
    """Wait for queued GPU work, so that timings and memory readings cover all of it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Workers: each runs in a fresh process and writes its result as JSON
# ---------------------------------------------------------------------------------------------


def run_prepare(args: argparse.Namespace) -> None:
    """Save the model as a safetensors folder and the calibration tokens, once for all workers.

    Loading the built-in GGUF model dequantizes it (~13 s); the measuring workers load the saved
    folder instead, and all of them read exactly the same calibration tokens. A local model folder
    is used as it is (a link to it), without loading its weights here.
    """
    import torch
    from transformers import AutoTokenizer

    import depthcut
    from depthcut.analysis.calibration import build_calibration
    from depthcut.io.data import load_texts

    folder = Path(args.model)
    if (folder / "config.json").is_file():
        (args.workdir / "model").symlink_to(folder.resolve(), target_is_directory=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        source = {"spec": args.model, "location": str(folder.resolve())}
    else:
        model, tokenizer, loaded = depthcut.load_model(args.model, dtype=args.dtype, device="cpu")
        model.save_pretrained(args.workdir / "model")
        tokenizer.save_pretrained(args.workdir / "model")
        source = loaded.as_dict()
    calibration = build_calibration(tokenizer, load_texts(str(args.data)), args.samples, args.seq_len, "windows", 0)
    torch.save(
        {
            "input_ids": calibration.input_ids,
            "attention_mask": calibration.attention_mask,
            "description": calibration.description,
            "mode": calibration.mode,
            "seed": calibration.seed,
        },
        args.workdir / "calibration.pt",
    )
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {
        "device": device,
        "model_source": source,
        "calibration": calibration.as_dict(),
        "environment": environment.record(device, args.dtype),
    }
    args.result.write_text(json.dumps(info))


def load_calibration(path: Path):
    """The calibration set the prepare step saved."""
    import torch

    from depthcut.analysis.calibration import CalibrationSet

    saved = torch.load(path, weights_only=True)
    return CalibrationSet(
        saved["input_ids"], saved["attention_mask"], saved["description"], saved["mode"], saved["seed"]
    )


def first_rows(calibration, count: int):
    """The first `count` samples as a calibration set of their own: the warm-up batch."""
    from depthcut.analysis.calibration import CalibrationSet

    return CalibrationSet(
        calibration.input_ids[:count],
        calibration.attention_mask[:count],
        calibration.description,
        calibration.mode,
        calibration.seed,
    )


def forward_all(module, calibration, batch_size: int, device) -> None:
    """Run `module` over every batch; the output is dropped at once, as a streaming caller would."""
    import torch

    with torch.inference_mode():
        for input_ids, attention_mask in calibration.batches(batch_size):
            module(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)


def make_runner(variant: str, model, tokenizer, batch_size: int, device, metrics=None, token_positions=None):
    """A function that processes a whole calibration set the way `variant` does."""
    if variant == "plain":
        return lambda calibration: forward_all(model, calibration, batch_size, device)
    if variant == "decoder":
        decoder = model.get_decoder()
        return lambda calibration: forward_all(decoder, calibration, batch_size, device)
    import depthcut

    chosen = {"metrics": metrics} if metrics else {}
    if token_positions is not None:
        chosen["token_positions"] = token_positions
    return lambda calibration: depthcut.analyze(model, tokenizer, calibration, batch_size=batch_size,
                                                progress=False, **chosen)


def time_passes(run, calibration, device, passes: int) -> list[float]:
    """Seconds taken by each of `passes` full passes over the calibration set."""
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        run(calibration)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def run_measurement(args: argparse.Namespace) -> None:
    """Load the model, warm up on one batch, take the memory baseline, time full passes (best kept).

    The warm-up batch is not timed: it pays for first-call costs (kernel selection, weight
    layouts, allocator growth) that a long analysis pays only once.
    """
    import torch

    import depthcut

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer, _ = depthcut.load_model(str(args.workdir / "model"), dtype=args.dtype, device=args.device)
    calibration = load_calibration(args.workdir / "calibration.pt")
    run = make_runner(args.worker, model, tokenizer, args.batch_size, device, args.metrics, args.token_positions)

    run(first_rows(calibration, args.batch_size))
    sync(device)
    gc.collect()
    baseline_rss = current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline_gpu = torch.cuda.memory_allocated(device)

    seconds = time_passes(run, calibration, device, args.passes)

    result = {
        "variant": args.worker,
        "batch_size": args.batch_size,
        "tokens": calibration.num_tokens,
        "pass_seconds": seconds,
        "tokens_per_s": calibration.num_tokens / min(seconds),
        "threads": torch.get_num_threads(),
        "peak_rss": peak_rss(),
        "baseline_rss": baseline_rss,
    }
    if device.type == "cuda":
        result["peak_gpu"] = torch.cuda.max_memory_allocated(device)
        result["baseline_gpu"] = baseline_gpu
    args.result.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Parent: spawn the workers, summarise, report
# ---------------------------------------------------------------------------------------------


def spawn(args: argparse.Namespace, worker: str, result: Path, *extra: str) -> dict:
    """Run this script as `worker` in a fresh Python process and return the JSON it wrote."""
    command = [
        sys.executable, str(Path(__file__).resolve()),
        "--worker", worker,
        "--workdir", str(args.workdir),
        "--result", str(result),
        "--model", args.model,
        "--dtype", args.dtype,
        "--device", args.device,
        "--passes", str(args.passes),
        *extra,
    ]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.metrics:
        command += ["--metrics", ",".join(args.metrics)]
    if args.token_positions is not None:
        command += ["--token-positions", str(args.token_positions)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {' '.join(command[2:])} failed:\n{completed.stderr[-4000:]}")
    return json.loads(result.read_text())


def prepare(args: argparse.Namespace) -> dict:
    """Save model and calibration data into the work folder (in a subprocess) and learn the device."""
    extra = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--data", str(args.data)]
    info = spawn(args, "prepare", args.workdir / "prepare.json", *extra)
    args.device = info["device"]
    return info


def measure_one(args: argparse.Namespace, variant: str, batch_size: int) -> dict:
    """One measurement of one variant at one batch size, in its own process."""
    result = args.workdir / f"{variant}-{batch_size}.json"
    return spawn(args, variant, result, "--batch-size", str(batch_size))


def memory_figures(run: dict, device: str) -> tuple[int, int]:
    """(peak, peak above the post-warm-up baseline) in bytes: GPU memory on CUDA, process RSS on CPU.

    The kernel updates ru_maxrss and the current RSS at slightly different moments, so a run
    that never grew past its baseline can read a few pages below it; that counts as zero.
    """
    if device.startswith("cuda"):
        peak, baseline = run["peak_gpu"], run["baseline_gpu"]
    else:
        peak, baseline = run["peak_rss"], run["baseline_rss"]
    return peak, max(peak - baseline, 0)


def summarise(runs: list[dict], device: str) -> dict:
    """Best throughput and worst peak memory of one variant's repeats at one batch size."""
    peaks = [memory_figures(run, device) for run in runs]
    return {
        "tokens_per_s": max(run["tokens_per_s"] for run in runs),
        "peak_memory": max(peak for peak, _ in peaks),
        "peak_above_baseline": max(above for _, above in peaks),
        "peak_rss": max(run["peak_rss"] for run in runs),
    }


def compare(best: dict[str, dict]) -> dict:
    """Analysis/plain (and analysis/decoder) ratios, checked against the targets."""
    plain, decoder, analysis = best["plain"], best["decoder"], best["analyze"]
    throughput = analysis["tokens_per_s"] / plain["tokens_per_s"]
    memory = analysis["peak_memory"] / plain["peak_memory"]
    # Floor of 1 MiB: at tiny batches both growths are a few pages and their ratio means nothing.
    above = max(analysis["peak_above_baseline"], MIB) / max(plain["peak_above_baseline"], MIB)
    return {
        "throughput_ratio": throughput,
        "throughput_ratio_vs_decoder": analysis["tokens_per_s"] / decoder["tokens_per_s"],
        "memory_ratio": memory,
        "memory_above_baseline_ratio": above,
        "throughput_pass": throughput >= THROUGHPUT_TARGET,
        "memory_pass": memory <= MEMORY_TARGET,
        "memory_above_baseline_pass": above <= MEMORY_TARGET,
    }


def measure(args: argparse.Namespace) -> list[dict]:
    """Interleave the variants per batch size, `repeats` rounds each, and summarise every batch size."""
    rows = []
    for batch_size in args.batch_sizes:
        runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
        for repeat in range(args.repeats):
            for variant in VARIANTS:
                run = measure_one(args, variant, batch_size)
                runs[variant].append(run)
                print(
                    f"  batch {batch_size:>3}  round {repeat + 1}  {variant:<8} {run['tokens_per_s']:8.1f} tok/s  "
                    f"peak RSS {run['peak_rss'] / MIB:7.1f} MiB (post-warm-up {run['baseline_rss'] / MIB:7.1f})",
                    flush=True,
                )
        best = {variant: summarise(runs[variant], args.device) for variant in VARIANTS}
        rows.append({"batch_size": batch_size, "best": best, **compare(best), "runs": runs})
    return rows


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def format_table(rows: list[dict], device: str) -> str:
    """The human-readable summary: one line per batch size, ratios with PASS/FAIL against the targets."""
    memory = "GPU" if device.startswith("cuda") else "RSS"
    t_target, m_target = f"(>={THROUGHPUT_TARGET})", f"(<={MEMORY_TARGET})"
    header = (
        f"{'batch':>5} | {'plain tok/s':>11} {'decoder tok/s':>13} {'analysis tok/s':>14} | "
        f"{'an/plain':>8} {t_target:>8} {'an/dec':>6} | "
        f"{'peak ' + memory + ' MiB plain':>18} {'analysis':>8} {'ratio':>5} {m_target:>8} | "
        f"{'above-baseline MiB plain':>24} {'analysis':>8} {'ratio':>5} {m_target:>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        plain, decoder, analysis = row["best"]["plain"], row["best"]["decoder"], row["best"]["analyze"]
        lines.append(
            f"{row['batch_size']:>5} | {plain['tokens_per_s']:>11.1f} {decoder['tokens_per_s']:>13.1f} "
            f"{analysis['tokens_per_s']:>14.1f} | {row['throughput_ratio']:>8.3f} "
            f"{verdict(row['throughput_pass']):>8} {row['throughput_ratio_vs_decoder']:>6.3f} | "
            f"{plain['peak_memory'] / MIB:>18.1f} {analysis['peak_memory'] / MIB:>8.1f} "
            f"{row['memory_ratio']:>5.2f} {verdict(row['memory_pass']):>8} | "
            f"{plain['peak_above_baseline'] / MIB:>24.1f} {analysis['peak_above_baseline'] / MIB:>8.1f} "
            f"{row['memory_above_baseline_ratio']:>5.2f} {verdict(row['memory_above_baseline_pass']):>8}"
        )
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> None:
    """Prepare once, measure every batch size, print the table and write the JSON results.

    The load average before and after is recorded: other work on the machine slows the
    multi-threaded forward passes badly and unevenly, so it is the first thing to check when
    figures look odd.
    """
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="depthcut-bench-") as tmp:
        args.workdir = Path(tmp)
        print(f"preparing {args.model} ({args.dtype}), {args.samples} x {args.seq_len} tokens", flush=True)
        info = prepare(args)
        print(
            f"measuring on {args.device}: {', '.join(VARIANTS)} (analysis metrics: {','.join(args.metrics or ['default'])}); "
            f"{args.repeats} rounds x {args.passes} passes",
            flush=True,
        )
        rows = measure(args)
    table = format_table(rows, args.device)
    results = {
        "config": {
            "model": args.model,
            "dtype": args.dtype,
            "device": args.device,
            "batch_sizes": args.batch_sizes,
            "samples": args.samples,
            "seq_len": args.seq_len,
            "threads": args.threads,
            "metrics": args.metrics or "default", "token_positions": args.token_positions,
            "repeats": args.repeats,
            "passes": args.passes,
            "data": str(args.data),
            "targets": {"throughput_ratio_min": THROUGHPUT_TARGET, "memory_ratio_max": MEMORY_TARGET},
            "model_source": info["model_source"],
            "calibration": info["calibration"],
        },
        "environment": {
            **info["environment"],
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "results": rows,
        "table": table,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print()
    print(table)
    print(environment.describe(results["environment"]))
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def batch_sizes(text: str) -> list[int]:
    """Parse "1,4,16" into [1, 4, 16]."""
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive integers, e.g. 1,4,16")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="MODEL as depthcut.load_model takes it")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch-sizes", type=batch_sizes, default=[1, 4, 16], help="comma-separated")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples per timed pass")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sample")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--metrics", type=lambda text: [m for m in text.split(",") if m], default=None,
                        help="the analysis' metrics, comma-separated (default: depthcut's defaults)")
    parser.add_argument("--token-positions", type=int, default=None,
                        help="tokens per sequence the all-token angular distance reads (default: analyze's, 128; "
                             "0: every one)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per variant, interleaved")
    parser.add_argument("--passes", type=int, default=2, help="timed passes per process; the fastest counts")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--data", type=Path, default=C4_SAMPLE, help="calibration text file (JSONL, txt, ...)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    internal = parser.add_argument_group("internal: set by the parent for its worker subprocesses")
    internal.add_argument("--worker", choices=("prepare", *VARIANTS), help=argparse.SUPPRESS)
    internal.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    internal.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    internal.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "prepare":
        run_prepare(args)
    elif args.worker:
        run_measurement(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()

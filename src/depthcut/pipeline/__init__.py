"""The commands as library functions: each validates its inputs once, chooses the streamed or the
in-memory path by itself, and writes what the command writes, with provenance.

    from depthcut.pipeline import analyze_to, prune_to
    analysis = analyze_to(model="smollm2-135m", data="c4", out="runs/a", samples=16)
    pruned = prune_to(model="smollm2-135m", drop=8, analysis="runs/a/analysis.json", out="runs/p")

Each takes its config (a dataclass, from which the command line's options are built) or the
config's fields as keywords.
"""

from depthcut.pipeline.analyze import AnalyzeConfig, analyze_to
from depthcut.pipeline.evaluate import EvalConfig, evaluate_to
from depthcut.pipeline.generate import GenerateConfig, generate
from depthcut.pipeline.heal import HealConfig, heal_to
from depthcut.pipeline.prune import PruneConfig, PruneResult, prune_to
from depthcut.pipeline.report import ReportConfig, report_to
from depthcut.pipeline.sweep import SweepConfig, sweep_to

__all__ = [
    "AnalyzeConfig", "EvalConfig", "GenerateConfig", "HealConfig", "PruneConfig", "PruneResult", "ReportConfig",
    "SweepConfig", "analyze_to", "evaluate_to", "generate", "heal_to", "prune_to", "report_to", "sweep_to",
]

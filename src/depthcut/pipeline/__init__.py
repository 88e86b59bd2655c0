"""The commands as library functions: each validates its inputs once, chooses the streamed or the
in-memory path by itself, and writes what the command writes, with provenance.

    from depthcut.pipeline import analyze_to, prune_to
    analysis = analyze_to(model="smollm2-135m", data="c4", out="runs/a", samples=16)
    pruned = prune_to(model="smollm2-135m", drop=8, analysis="runs/a/analysis.json", out="runs/p")

Each takes its config (a dataclass in `depthcut.pipeline.configs`, from which the command line's
options are built) or the config's fields as keywords.
"""

from depthcut.lazy import lazy_attributes

# Imported on first use: the command line reads the configs without importing torch (depthcut.lazy).
_SOURCES = {
    "depthcut.pipeline.configs": "AnalyzeConfig EvalConfig GenerateConfig HealConfig PruneConfig ReportConfig "
                                 "ShrinkConfig SweepConfig",
    "depthcut.pipeline.analyze": "analyze_to", "depthcut.pipeline.evaluate": "evaluate_to",
    "depthcut.pipeline.generate": "generate", "depthcut.pipeline.heal": "heal_to",
    "depthcut.pipeline.prune": "PruneResult prune_to", "depthcut.pipeline.report": "report_to",
    "depthcut.pipeline.shrink": "shrink_to", "depthcut.pipeline.sweep": "sweep_to",
}
__getattr__, __dir__ = lazy_attributes(__name__, _SOURCES)
__all__ = sorted(name for names in _SOURCES.values() for name in names.split())

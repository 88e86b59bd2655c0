"""Training-free repair of a pruned model, folded into the weights of the model it came from.

After the contiguous block of layers [l, l+n) is removed, the stream that enters layer l+n is
x_l instead of x_{l+n}. A repair method fits, on calibration data, a cheap map that brings the
one closer to the other and folds it into weights the model already has: the repaired model
gains no parameter and stays a plain architecture. Each method is a small registered plugin
(see `REPAIRS`); the flow is

    stats = repair_statistics(model, calibration, range(l, l + n), ["lstsq"])
    fit = fit_repair("lstsq", stats)
    apply_repair(model, fit)            # on the UNPRUNED model, original layer indices
    depthcut.prune(model, range(l, l + n))

or `repair(model, tokenizer, data, block, method)` for all three at once. A cut of several gaps
(runs of consecutive layers) gets one map per gap, fitted in order: `fit_gaps`, `apply_gaps`,
`gaps_folded` (`depthcut.repair.gaps`). See docs/repair.md.
"""

from depthcut.lazy import lazy_attributes
from depthcut.registry import Registry

# The registry is declared here, without torch: the command line lists the methods (its --repair
# choices) before importing any; `REPAIRS.get` imports the module that registers one.
REPAIRS: Registry = Registry("repair method")
for _name, _description in {
    "lstsq": "ReplaceMe: least-squares map T folded into layer l-1's MLP output projection",
    "cosine": "ReplaceMe: T tuned by Adam on the cosine distance, from the lstsq solution",
    "magnitude": "Prune&Comp: the norm ratio alpha folded into every residual writer before the cut",
}.items():
    REPAIRS.declare(_name, f"depthcut.repair.{_name}", _description)  # each method in the module of its name

_SOURCES = {
    "depthcut.repair.methods": "RepairFit RepairMethod apply_repair check_repair fit_repair repair_folded",
    "depthcut.repair.statistics": "RepairStatistics block_statistics contiguous_block repair_statistics",
    "depthcut.repair.run": "repair",
    "depthcut.repair.gaps": "apply_gaps check_gaps fit_gaps gap_runs gaps_folded",
}
__getattr__, __dir__ = lazy_attributes(__name__, _SOURCES)
__all__ = ["REPAIRS", *sorted(name for names in _SOURCES.values() for name in names.split())]

"""depthcut: find the layers of a decoder LLM that do the least work, remove them, measure the cost."""

__version__ = "0.1.0"

import logging as _logging

# peft imports bitsandbytes when it is installed, and bitsandbytes' CPU backend then announces that
# a hub-downloaded kernel for its inference-only packed 4-bit path is missing. depthcut never uses
# that path (healing turns it off: see depthcut.healing.trainer.keep_4bit_differentiable), so
# there is nothing for a user to act on.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from depthcut.analysis import analyze, analyze_streamed
from depthcut.calibration import CalibrationSet, build_calibration
from depthcut.data import load_texts
from depthcut.errors import DepthcutError
from depthcut.layers import find_layer_stack
from depthcut.models import load_model
from depthcut.result import Analysis
from depthcut.strategies import select
from depthcut.surgery import prune

__all__ = [
    "Analysis",
    "CalibrationSet",
    "DepthcutError",
    "__version__",
    "analyze",
    "analyze_streamed",
    "build_calibration",
    "find_layer_stack",
    "load_model",
    "load_texts",
    "prune",
    "select",
]

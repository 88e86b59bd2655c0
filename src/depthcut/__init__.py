"""depthcut: find the layers of a decoder LLM that do the least work, remove them, measure the cost."""

__version__ = "0.1.0"

import logging as _logging

# peft imports bitsandbytes when it is installed, and bitsandbytes' CPU backend then announces that
# a hub-downloaded kernel for its inference-only packed 4-bit path is missing. depthcut never uses
# that path (healing turns it off: see depthcut.healing.trainer.keep_4bit_differentiable), so
# there is nothing for a user to act on.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from depthcut.analysis import analyze, analyze_streamed  # noqa: E402
from depthcut.calibration import CalibrationSet, build_calibration  # noqa: E402
from depthcut.data import load_texts  # noqa: E402
from depthcut.errors import DepthcutError  # noqa: E402
from depthcut.layers import find_layer_stack  # noqa: E402
from depthcut.models import load_model  # noqa: E402
from depthcut.result import Analysis  # noqa: E402
from depthcut.strategies import select  # noqa: E402
from depthcut.surgery import prune  # noqa: E402

__all__ = [
    "Analysis",
    "CalibrationSet",
    "DepthcutError",
    "analyze",
    "analyze_streamed",
    "build_calibration",
    "find_layer_stack",
    "load_model",
    "load_texts",
    "prune",
    "select",
    "__version__",
]

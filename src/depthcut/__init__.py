"""depthcut: find the layers of a decoder LLM that do the least work, remove them, measure the cost."""

__version__ = "0.1.0"

import logging as _logging

from depthcut.lazy import lazy_attributes
from depthcut.logs import configure as _configure_logging

# peft imports bitsandbytes when it is installed, and bitsandbytes' CPU backend then announces that
# a hub-downloaded kernel for its inference-only packed 4-bit path is missing. depthcut never uses
# that path (healing turns it off: see depthcut.healing.trainer.keep_4bit_differentiable), so
# there is nothing for a user to act on.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
_configure_logging()  # depthcut's notes on stderr, in a notebook as on the command line (depthcut.logs)

# The public API, imported on first use: `import depthcut` does not import torch (see depthcut.lazy).
_SOURCES = {
    "depthcut.analysis.passes": "analyze analyze_streamed", "depthcut.analysis.result": "Analysis",
    "depthcut.analysis.calibration": "CalibrationSet build_calibration", "depthcut.errors": "DepthcutError",
    "depthcut.model.layers": "find_layer_stack", "depthcut.model.loading": "load_model",
    "depthcut.model.surgery": "prune", "depthcut.io.data": "load_texts", "depthcut.strategies": "select",
    "depthcut.pipeline.shrink": "shrink",
}
__getattr__, __dir__ = lazy_attributes(__name__, _SOURCES)
__all__ = ["__version__", *sorted(name for names in _SOURCES.values() for name in names.split())]

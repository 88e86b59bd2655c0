"""Which layers do the least work: the calibration set (`calibration`), the residual stream captured
at each layer boundary (`capture`), the in-memory pass (`passes.analyze`) and the layer-streamed one
(`passes.analyze_streamed`: `streamed` replays one layer at a time, reading weights through
`checkpoint` or `gguf_checkpoint` and keeping boundary states in the `spill`), the result
(`result.Analysis`) and its heatmap (`heatmap`)."""

from depthcut.lazy import lazy_attributes

# Imported on first use, so that the light `result` module does not bring torch (see depthcut.lazy).
_SOURCES = {
    "depthcut.analysis.result": "Analysis",
    "depthcut.analysis.calibration": "CalibrationSet build_calibration",
    "depthcut.analysis.passes": "analyze analyze_streamed",
}
__getattr__, __dir__ = lazy_attributes(__name__, _SOURCES)
__all__ = sorted(name for names in _SOURCES.values() for name in names.split())

"""`report_to`: a sweep's figures and report.html drawn again from its results.jsonl alone."""

from __future__ import annotations

from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.claims import claimed_output
from depthcut.pipeline.configs import ReportConfig
from depthcut.pipeline.options import make_config
from depthcut.sweep.report import build_report, check_tolerance
from depthcut.sweep.results import ResultsLog


def report_to(config: ReportConfig | None = None, /, **fields) -> Path:
    """Rebuild FOLDER/figures and FOLDER/report.html (no model is loaded); returns the report's path."""

    config = make_config(ReportConfig, config, fields)
    check_tolerance(config.tolerance)
    if not ResultsLog(config.folder).points():
        raise DepthcutError(f"{config.folder} holds no sweep results (results.jsonl)")
    with claimed_output(config.folder, False, "dir", may_exist=True):  # not while a sweep or report writes it
        return build_report(config.folder, config.tolerance)

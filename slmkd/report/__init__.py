"""Stage 05, the report: tables, seed × item statistics (:mod:`slmkd.stats`) and figures
(:mod:`slmkd.report.figures`) computed from the ``eval/`` folders alone (:mod:`.build`)."""

from slmkd.report.build import (
    EvalResult,
    ReportResult,
    build_report,
    check_same_items,
    collect_results,
    item_ids_hash,
    write_report,
)
from slmkd.report.cascade import error_propagation_by_method, show_error_propagation

__all__ = ["EvalResult", "ReportResult", "build_report", "check_same_items", "collect_results",
           "error_propagation_by_method", "item_ids_hash", "show_error_propagation", "write_report"]

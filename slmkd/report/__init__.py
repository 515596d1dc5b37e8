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

__all__ = ["EvalResult", "ReportResult", "build_report", "check_same_items", "collect_results",
           "item_ids_hash", "write_report"]

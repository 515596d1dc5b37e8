"""Stage 04, evaluation: generate and score every item of GSM8K / BBH for one model
(:mod:`slmkd.evaluation.evaluate`), the resumable prediction files (:mod:`.predictions`), the
leakage guard (:mod:`.leakage`) and CasCoD's error-propagation probe (:mod:`.propagation`).

Answer extraction and correctness are :mod:`slmkd.scoring` (re-exported here for compatibility).
"""

from slmkd.evaluation.evaluate import (
    evaluate_model,
    evaluate_on_datasets,
    evaluate_run,
    evaluate_study,
    evaluation_records,
    format_summary_line,
    open_evaluation_engine,
    read_train_summary,
)
from slmkd.evaluation.leakage import LeakageError, check_no_leakage, training_questions_for_run
from slmkd.evaluation.predictions import (
    CASCOD_METHODS,
    EVAL_META_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    eval_dir,
    item_ids_hash,
    read_predictions,
    rescore_eval_dir,
    run_model_slug,
    summarize_predictions,
)
from slmkd.evaluation.propagation import error_propagation
from slmkd.scoring import (
    BBH_TASK_TYPES,
    FINAL_ANSWER_PREFIX,
    bbh_task_type,
    extract_answer,
    extract_bbh,
    extract_gsm8k,
    is_correct,
    normalize_number,
    parse_options,
    score_prediction,
)

__all__ = ["BBH_TASK_TYPES", "CASCOD_METHODS", "EVAL_META_FILE", "FINAL_ANSWER_PREFIX",
           "LeakageError", "PREDICTIONS_FILE", "SUMMARY_FILE", "bbh_task_type", "check_no_leakage",
           "error_propagation", "eval_dir", "evaluate_model", "evaluate_on_datasets", "evaluate_run",
           "evaluate_study",
           "evaluation_records", "open_evaluation_engine",
           "extract_answer", "extract_bbh", "extract_gsm8k", "format_summary_line", "is_correct",
           "item_ids_hash", "normalize_number", "parse_options", "read_predictions",
           "read_train_summary", "rescore_eval_dir", "run_model_slug", "score_prediction",
           "summarize_predictions", "training_questions_for_run"]

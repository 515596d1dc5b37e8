"""Stages 02/03, training: :func:`train` runs one method × student × seed, resumably.

Modules: :mod:`.staged` (``train``: one run, or a two-stage method stage by stage), :mod:`.run`
(the run directory, resume check, set-up of one run), :mod:`.trainer`
(:class:`DistillationTrainer`: losses, guards, schedules), :mod:`.methods` (the registry),
:mod:`.sft_kd` and :mod:`.cascod` (the methods), :mod:`.data` (examples, collator, CoT records),
:mod:`.checkpoint` (manifests, Drive sync, resume selection), :mod:`.monitor` (logs, plots).
"""

from slmkd.training.final_copy import pending_final_copies, wait_for_final_copies
from slmkd.training.method_spec import MethodSpec
from slmkd.training.methods import get_method, register_method, registered_methods
from slmkd.training.run import (
    CONFIG_NAME,
    FINAL_DIR,
    RUN_META_NAME,
    SUMMARY_NAME,
    RunConfigMismatchError,
    TrainResult,
    is_run_complete,
    local_checkpoint_dir,
    run_dir_for,
    run_identity,
)
from slmkd.training.sft_kd import build_cot_datasets, kd_or_ce_loss
from slmkd.training.staged import train
from slmkd.training.trainer import (
    FAULT_KILL_ENV,
    STATE_NAME,
    DistillationTrainer,
    GuardState,
    ScheduleCallback,
    default_count_items,
)

__all__ = ["CONFIG_NAME", "FAULT_KILL_ENV", "FINAL_DIR", "RUN_META_NAME", "STATE_NAME", "SUMMARY_NAME",
           "DistillationTrainer", "GuardState", "MethodSpec", "RunConfigMismatchError",
           "ScheduleCallback", "TrainResult", "build_cot_datasets", "default_count_items",
           "get_method", "is_run_complete", "kd_or_ce_loss", "local_checkpoint_dir",
           "pending_final_copies", "register_method", "registered_methods", "run_dir_for",
           "run_identity", "train", "wait_for_final_copies"]

"""Stage 01, the teacher's chain of thought: greedy generation (:mod:`slmkd.teacher.cot`), the
filters every completion passes (:mod:`slmkd.teacher.filters`) and the shard store on Drive
(:mod:`slmkd.teacher.store`)."""

from slmkd.teacher.cot import CoTConfigMismatchError, CoTResult, generate_cot, is_cot_complete
from slmkd.teacher.filters import ALL_FLAGS, FilterConfig, FilterResult, apply_filters
from slmkd.teacher.store import (
    ShardScan,
    cot_dir,
    gen_config_hash,
    generation_settings,
    load_cot_records,
    scan_shards,
)

__all__ = ["ALL_FLAGS", "CoTConfigMismatchError", "CoTResult", "FilterConfig", "FilterResult",
           "ShardScan", "apply_filters", "cot_dir", "gen_config_hash", "generate_cot",
           "generation_settings", "is_cot_complete", "load_cot_records", "scan_shards"]

"""BIG-Bench Hard loader: a local folder (``tasks/*.json`` + ``cot-prompts/*.txt``, as in
suzgunmirac/BIG-Bench-Hard) or the Hub (``lukaemon/bbh``; prompts from the GitHub repository)."""

from __future__ import annotations

import json
from pathlib import Path

from slmkd.data.records import LoadResult, Record

HUB_NAME = "lukaemon/bbh"
PROMPTS_URL = "https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main/cot-prompts/{task}.txt"
BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two",
    "navigate", "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects",
    "ruin_names", "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects",
    "web_of_lies", "word_sorting",
)


def _task_rows(task: str, bbh_dir: Path | None) -> list[dict]:
    if bbh_dir is None:
        from datasets import load_dataset

        return [dict(r) for r in load_dataset(HUB_NAME, task, split="test")]
    path = bbh_dir / "tasks" / f"{task}.json"
    return json.loads(path.read_text(encoding="utf-8"))["examples"]


def load_bbh(bbh_dir: str | Path | None = None, tasks: list[str] | None = None) -> LoadResult:
    """Load BBH items (all 27 tasks by default). Local tasks that are absent are skipped and
    reported; malformed examples are counted."""
    result = LoadResult()
    root = Path(bbh_dir) if bbh_dir is not None else None
    if root is not None and not (root / "tasks").is_dir():
        raise FileNotFoundError(f"BBH folder {root} has no tasks/ subfolder")
    for task in tasks or BBH_TASKS:
        if root is not None and not (root / "tasks" / f"{task}.json").is_file():
            result.skipped.append((task, "missing_task_file"))
            continue
        for i, ex in enumerate(_task_rows(task, root)):
            rid = f"bbh-{task}-{i:04d}"
            q, t = ex.get("input"), ex.get("target")
            if not isinstance(q, str) or not q.strip() or not isinstance(t, str) or not t.strip():
                result.skipped.append((rid, "missing_field: input/target"))
                continue
            result.records.append(Record(rid, "bbh", task, "test", q, t.strip(), None))
    return result


def clean_cot_prompt(text: str) -> str:
    """Drop the canary line and the ``-----`` separator that start every official prompt file."""
    if "-----" in text:
        text = text.split("-----", 1)[1]
    lines = [ln for ln in text.splitlines() if "canary" not in ln.lower()]
    return "\n".join(lines).strip()


def load_bbh_cot_prompts(bbh_dir: str | Path | None = None,
                         tasks: list[str] | None = None) -> dict[str, str]:
    """The official 3-shot CoT prompt of each task, canary removed."""
    prompts: dict[str, str] = {}
    for task in tasks or BBH_TASKS:
        if bbh_dir is None:
            import urllib.request

            with urllib.request.urlopen(PROMPTS_URL.format(task=task), timeout=30) as r:
                text = r.read().decode("utf-8")
        else:
            path = Path(bbh_dir) / "cot-prompts" / f"{task}.txt"
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8")
        prompts[task] = clean_cot_prompt(text)
    return prompts

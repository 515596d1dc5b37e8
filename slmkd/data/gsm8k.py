"""GSM8K loader: the Hub (``openai/gsm8k``, config ``main``) or a local JSONL in the original format
(``{"question", "answer"}`` with the answer = rationale lines, then ``#### N``)."""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from slmkd.data.records import LoadResult, Record

HUB_NAME = "openai/gsm8k"
_CALC = re.compile(r"<<[^>]*>>")


def normalize_number(s: str | None) -> str | None:
    """Canonical string of a number: ``"$1,234.50"`` -> ``"1234.5"``, ``"18.00"`` -> ``"18"``.

    Strips ``$``, thousands commas, spaces, a trailing period and a trailing ``%``. Returns
    ``None`` when the text is not a number.
    """
    if s is None:
        return None
    t = str(s).strip().replace("$", "").replace(",", "").replace(" ", "")
    t = t.rstrip(".").rstrip("%")
    if t.startswith("+"):
        t = t[1:]
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", t):
        return None
    try:
        d = Decimal(t)
    except InvalidOperation:  # pragma: no cover - guarded by the regex
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def parse_gsm8k_answer(answer: str) -> tuple[str, str]:
    """Split an original GSM8K answer into (rationale without ``<<calc>>``, final number).

    Raises ``ValueError`` when there is no ``####`` line or the final answer is not a number."""
    if "####" not in answer:
        raise ValueError("no '####' final-answer line")
    rationale, final = answer.rsplit("####", 1)
    number = normalize_number(final)
    if number is None:
        raise ValueError(f"unparsable final answer {final.strip()!r}")
    return _CALC.sub("", rationale).strip(), number


def records_from_rows(rows: list[dict | None], split: str,
                      skipped: list[tuple[str, str]]) -> list[Record]:
    """Records from raw rows; ``None`` rows (already reported as malformed) keep their index."""
    records = []
    for i, row in enumerate(rows):
        rid = f"gsm8k-{split}-{i:05d}"
        if row is None:
            continue
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str):
            skipped.append((rid, "missing_field: question/answer"))
            continue
        try:
            rationale, number = parse_gsm8k_answer(a)
        except ValueError as e:
            skipped.append((rid, f"bad_answer: {e}"))
            continue
        records.append(Record(rid, "gsm8k", None, split, q.strip(), number, rationale))
    return records


def load_gsm8k(split: str = "test", path: str | Path | None = None) -> LoadResult:
    """Load GSM8K ``split`` from a local JSONL ``path`` or, when ``path`` is None, from the Hub.

    Malformed lines and bad records are counted in ``LoadResult.skipped``, never fatal."""
    result = LoadResult()
    if path is None:
        from datasets import load_dataset

        rows = [dict(r) for r in load_dataset(HUB_NAME, "main", split=split)]
    else:
        p = Path(path)
        if p.is_dir():
            p = p / f"{split}.jsonl"
        if not p.is_file():
            raise FileNotFoundError(f"GSM8K file not found: {p}")
        rows: list[dict | None] = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                result.skipped.append((f"{p.name}:{n}", "malformed_json"))
                rows.append(None)
    result.records = records_from_rows(rows, split, result.skipped)
    return result

"""lm-evaluation-harness per-item answer filters and ``exact_match``, reimplemented exactly.

Reproduces, for lm-evaluation-harness **0.4.13**, the answer extraction ("filters") and the
exact-match decision of the tasks below, without importing ``lm_eval`` (stdlib only; the
``regex`` and ``word2number`` helpers the harness uses are reimplemented here).  Agreement with
the harness's own filter classes and metric is checked item by item in
``tests/test_scoring_harness.py``.

GSM8K -- task ``gsm8k_cot_zeroshot`` (``tasks/gsm8k/gsm8k-cot-zeroshot.yaml``)
    * ``strict-match``: ``regex`` filter, pattern ``The answer is (\\-?[0-9\\.\\,]+).``,
      group_select 0 (first match), then ``take_first``; no match -> ``"[invalid]"``.
      The trailing ``.`` is the regex "any character", so ``"The answer is 18"`` (no period, end
      of text) gives ``"1"``, ``"The answer is 18\\n"`` also ``"1"``, ``"The answer is 18."``
      gives ``"18"``, ``"The answer is $18."`` gives ``"[invalid]"``.
    * ``flexible-extract``: ``regex`` filter, pattern ``(-?[$0-9.,]{2,})|(-?[0-9]+)``,
      group_select -1 (last match; of the two groups the first non-empty one), ``take_first``.
      E.g. an ellipsis ``"..."`` is a match, ``"**18**"`` gives ``"18"``.
    * ``exact_match``: ``ignore_case: true``, ``ignore_punctuation: false``,
      ``regexes_to_ignore: [",", "\\$", "(?s).*#### ", "\\.$"]`` applied (in that order, with
      ``re.sub``) to prediction *and* target.  The harness target is the full GSM8K answer
      (``doc_to_target: "{{answer}}"``); ``(?s).*#### `` strips its rationale, so passing only
      the final number (``"18"``, ``"1,000"``) gives the same decision.

BBH strict -- tasks ``bbh_cot_fewshot_*`` (``tasks/bbh/cot_fewshot/_cot_fewshot_template_yaml``)
    * ``get-answer``: ``regex`` filter, pattern ``(?<=the answer is )(.*)(?=.)`` (lower-case
      "the" only; the greedy group stops one character before the end of the line), group 0,
      ``take_first``.  ``"So the answer is (B)."`` -> ``"(B)"``; without the period -> ``"(B"``;
      ``"So the answer is ."`` -> ``""`` (an empty match, not the fallback);
      ``"The answer is (B)."`` -> ``"[invalid]"``.
    * ``exact_match`` with no options (plain string equality).

BBH flexible -- tasks ``bbh_cot_zeroshot_*`` (``tasks/bbh/cot_zeroshot/*.yaml`` and ``utils.py``),
filter ``flexible-extract`` (then ``take_first``), per task type:
    * multiple choice (``utils.MultiChoiceRegexFilter``, group_select -1, ignore_case and
      ignore_punctuation true): date_understanding, disambiguation_qa, geometric_shapes,
      hyperbaton, logical_deduction_{three,five,seven}_objects, movie_recommendation,
      penguins_in_a_table, reasoning_about_colored_objects, ruin_names,
      salient_translation_error_detection, snarks, temporal_sequences,
      tracking_shuffled_objects_{three,five,seven}_objects.
      1. last ``(\\([A-Z]\\))`` in the output (any letter, even one that is not an option);
      2. else the option texts, parsed from the question with ``\\([A-Z]\\)([^\\n^(]*)``, stripped,
         lower-cased and stripped of Unicode punctuation (category P*), are searched
         (longest first) in the equally normalised output; the last hit maps to ``(A)``, ``(B)``...
         (duplicate option texts map to the later letter);
      3. else the last ``:[\\s]*(A|B|...)`` (the option letters) in the raw output -> ``(X)``;
      4. else ``"[invalid]"``.
      Without ``question`` steps 2-3 behave as for a question with no options (step 2 then
      matches nothing useful, step 3 needs ``":"`` followed by nothing -> never), i.e. only
      step 1 counts.
    * boolean_expressions: ``regex`` ``\\b(True|False)\\b``, group_select -1.
    * causal_judgement, navigate: ``regex`` ``\\b(Yes|No|yes|no)\\b``, group_select -1.
    * formal_fallacies: ``regex`` ``\\b(valid|invalid)\\b``, group_select -1.
    * dyck_languages: ``regex`` ``(?<= )([" \\[\\(<{}>\\)\\]]+)|([" \\[\\(<{}>\\)\\]]+)``,
      group_select -1, stripped -- a lone space is a match, so an output ending in words gives
      ``""``.
    * multistep_arithmetic_two, object_counting (``utils.NumberParseRegexFilter``):
      last ``([-0-9]+)`` (a bare ``-`` counts); else the last English number phrase (the
      harness's unanchored word regex, matched on the lower-cased output: "none" -> 1,
      "fourteen" -> 4, "seven hundred" -> 100, "twenty six" -> 20, bare "six"/"seven"/"eight"/
      "nine" are not matched)
      converted with ``word2number.w2n.word_to_num`` (reimplemented here); else ``"[invalid]"``.
      Where the harness itself crashes (``word_to_num`` raising, e.g. on "trillion" or
      "one million thousand") this module returns ``"[invalid]"``.
    * sports_understanding (``utils.MapRegexFilter``, ignore_case): last match of
      ``\\b(no|not plausible)\\b|\\b(yes|plausible)\\b`` in the lower-cased output, mapped to
      ``"no"`` / ``"yes"``.
    * web_of_lies (``utils.MapRegexFilter``, ignore_case):
      ``\\b(no|does not tell the truth|is not telling the truth)\\b`` -> ``"no"``,
      ``\\b(yes|tells the truth|is telling the truth)\\b`` -> ``"yes"``.
    * word_sorting (``utils.WordSortFilter``): the words after ``"List:"`` in the question
      (unescaped, each as ``\\bword\\b``) found in the output, deduplicated keeping each word's
      last occurrence, joined with spaces (no fallback: ``""`` when none).  Needs ``question``.
    * ``exact_match`` (``_cot_zeroshot_template_yaml``): ``ignore_case: true``,
      ``regexes_to_ignore: ["\\.$", ",", "\\\\", "\\n", '"']`` (period at the end, commas,
      backslashes, newlines, double quotes) on prediction and target.

``exact_match`` is the harness's ``exact_match_hf_evaluate`` on one-element numpy arrays; its
numpy quirks are reproduced: trailing NUL characters are dropped, and lower-casing is
truncated to the array's width (``"İ"`` lower-cases to ``"i"``, not ``"i̇"``).

Not reproduced: a BBH target that looks like a Python list (``"[...]"``) is ``literal_eval``-ed
by the harness's ``doc_to_target``; no BBH target has that form.
"""

from __future__ import annotations

import functools
import re
import string
import sys
import unicodedata

__all__ = [
    "BBH_TASKS",
    "FALLBACK",
    "bbh_flexible",
    "bbh_strict",
    "exact_match",
    "gsm8k_flexible",
    "gsm8k_strict",
    "harness_scores",
    "task_type",
]

HARNESS_VERSION = "0.4.13"
FALLBACK = "[invalid]"

# --- exact_match settings ---------------------------------------------------------------
GSM8K_EM = {"ignore_case": True, "ignore_punctuation": False,
            "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}
BBH_STRICT_EM = {"ignore_case": False, "ignore_punctuation": False, "regexes_to_ignore": None}
BBH_FLEXIBLE_EM = {"ignore_case": True, "ignore_punctuation": False,
                   "regexes_to_ignore": ["\\.$", ",", "\\\\", "\n", '"']}

# --- patterns -------------------------------------------------------------------------------
GSM8K_STRICT_RE = re.compile(r"The answer is (\-?[0-9\.\,]+).")
GSM8K_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
BBH_STRICT_RE = re.compile(r"(?<=the answer is )(.*)(?=.)")

MC_RE = re.compile(r"(\([A-Z]\))")
MC_OPTION_RE = re.compile(r"\([A-Z]\)([^\n^(]*)")
BOOL_RE = re.compile(r"\b(True|False)\b")
YESNO_RE = re.compile(r"\b(Yes|No|yes|no)\b")
VALID_RE = re.compile(r"\b(valid|invalid)\b")
DYCK_RE = re.compile(r'(?<= )([" \[\(<{}>\)\]]+)|([" \[\(<{}>\)\]]+)')
NUMBER_RE = re.compile(r"([-0-9]+)")

# The harness compiles this with the third-party ``regex`` module.  Translated for ``re``:
# the branch-reset groups ``(?|teen|ty)`` hold no captures, so they equal ``(?:teen|ty)``;
# ``regex``'s ``\s`` is Unicode White_Space, which (unlike ``re``'s) excludes U+001C..U+001F.
_HARNESS_ENGLISH_NUMBER = (
    "((?:(?:zero|one|two|three|four|five|(?:twen|thir|for|fif|six|seven|nine)(?|teen|ty)|eight(?:|een|y)"
    "|ten|eleven|twelve|fourteen|hundred|thousand|(?:m|b|tr)illion)(?:zero|one|two|three|four|five"
    "|(?:twen|thir|for|fif|six|seven|nine)(?:|teen|ty)|eight(?|een|y)|ten|eleven|twelve|fourteen"
    "|hundred|thousand|(?:m|b|tr)illion|[^\\S\r\n]|,|and|&)+)?(?:zero|one|two|three|four|five"
    "|(?:twen|thir|for|fif|six|seven|nine)(?|teen|ty)|eight(?|een|y)|ten|eleven|twelve|fourteen"
    "|hundred|thousand|(?:m|b|tr)illion))"
)
ENGLISH_NUMBER_RE = re.compile(
    _HARNESS_ENGLISH_NUMBER.replace("(?|", "(?:").replace("[^\\S\r\n]", "[^\\S\r\n\x1c-\x1f]")
)

SPORTS_MAP = {r"\b(no|not plausible)\b": "no", r"\b(yes|plausible)\b": "yes"}
WEB_OF_LIES_MAP = {
    r"\b(no|does not tell the truth|is not telling the truth)\b": "no",
    r"\b(yes|tells the truth|is telling the truth)\b": "yes",
}

_MC_TASKS = (
    "date_understanding", "disambiguation_qa", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection",
    "snarks", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects",
)
_TASK_TYPES = {
    **{t: "multiple_choice" for t in _MC_TASKS},
    "boolean_expressions": "true_false",
    "causal_judgement": "yes_no",
    "navigate": "yes_no",
    "formal_fallacies": "valid_invalid",
    "dyck_languages": "dyck",
    "multistep_arithmetic_two": "number",
    "object_counting": "number",
    "sports_understanding": "map_sports",
    "web_of_lies": "map_web_of_lies",
    "word_sorting": "word_sort",
}
BBH_TASKS = tuple(sorted(_TASK_TYPES))
_PREFIXES = ("bbh_cot_zeroshot_", "bbh_cot_fewshot_", "bbh_zeroshot_", "bbh_fewshot_", "bbh_")


def _task_name(task: str) -> str:
    name = task
    for prefix in _PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in _TASK_TYPES:
            name = name[len(prefix):]
            break
    if name not in _TASK_TYPES:
        raise ValueError(f"unknown BBH task {task!r}; expected one of {', '.join(BBH_TASKS)}")
    return name


def task_type(task: str) -> str:
    """The flexible-extract filter family of a BBH task (e.g. ``"multiple_choice"``)."""
    return _TASK_TYPES[_task_name(task)]


# --- filter building blocks ---------------------------------------------------------------------
def _regex_filter(regex: re.Pattern, text: str, group_select: int = 0) -> str:
    """``lm_eval.filters.extraction.RegexFilter`` on one response."""
    if not isinstance(text, str):
        text = ""
    found = regex.findall(text)
    if not found:
        return FALLBACK
    match = found[group_select]
    if isinstance(match, tuple):
        non_empty = [m for m in match if m]
        if not non_empty:
            return FALLBACK
        match = non_empty[0]
    return match.strip()


def _find_match(regex: re.Pattern, text: str, convert: dict | None = None, group_select: int = -1):
    """``ExtendedRegexFilter.find_match`` of the BBH zero-shot ``utils.py`` (falsy when no hit)."""
    found = regex.findall(text)
    if not found:
        return ""
    match = found[group_select]
    if isinstance(match, tuple):
        match = [m for m in match if m][0]
    match = match.strip()
    if match and convert and match in convert:
        match = convert[match]
    return match


@functools.lru_cache(maxsize=1)
def _punct_table() -> dict:
    # Same range as the harness: range(sys.maxunicode), i.e. U+10FFFF itself excluded.
    return dict.fromkeys(
        i for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P")
    )


def _normalise_mc(text: str) -> str:
    """``filter_ignores`` with ignore_case and ignore_punctuation (no regexes to ignore)."""
    return text.lower().translate(_punct_table())


def _multiple_choice(text: str, question: str | None) -> str:
    match = _find_match(MC_RE, text)
    if not match:
        options = MC_OPTION_RE.findall(question or "")
        escaped, choice_to_alpha, letters, letter_to_target = [], {}, [], {}
        letter = "A"
        for option in options:
            key = _normalise_mc(option.strip())
            escaped.append(re.escape(key))
            choice_to_alpha[key] = f"({letter})"
            letters.append(letter)
            letter_to_target[letter] = f"({letter})"
            letter = chr(ord(letter) + 1)
        option_re = re.compile("|".join(sorted(escaped, key=len, reverse=True)))
        letter_re = re.compile(rf":[\s]*({'|'.join(letters)})")
        match = _find_match(option_re, _normalise_mc(text), choice_to_alpha)
        if not match:
            match = _find_match(letter_re, text, letter_to_target)
    return match or FALLBACK


_W2N = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
    "ninety": 90, "hundred": 100, "thousand": 1000, "million": 1000000, "billion": 1000000000,
    "point": ".",
}
_DECIMAL_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _number_formation(words: list[str]) -> int:
    nums = [_W2N[w] for w in words]  # IndexError below on an empty list, as in word2number
    if len(nums) == 4:
        return nums[0] * nums[1] + nums[2] + nums[3]
    if len(nums) == 3:
        return nums[0] * nums[1] + nums[2]
    if len(nums) == 2:
        return nums[0] * nums[1] if 100 in nums else nums[0] + nums[1]
    return nums[0]


def _word_to_num(sentence: str):
    """``word2number.w2n.word_to_num`` (1.1); raises ``ValueError``/``IndexError`` like it."""
    sentence = sentence.replace("-", " ").lower()
    if sentence.isdigit():
        return int(sentence)
    words = [w for w in sentence.strip().split() if w in _W2N]
    if not words:
        raise ValueError("no valid number words")
    if any(words.count(w) > 1 for w in ("thousand", "million", "billion", "point")):
        raise ValueError("redundant number word")
    decimals: list[str] = []
    if "point" in words:
        decimals = words[words.index("point") + 1:]
        words = words[:words.index("point")]
    bi = words.index("billion") if "billion" in words else -1
    mi = words.index("million") if "million" in words else -1
    th = words.index("thousand") if "thousand" in words else -1
    if (th > -1 and (th < mi or th < bi)) or (mi > -1 and mi < bi):
        raise ValueError("malformed number")
    total = 0
    if len(words) == 1:
        total += _W2N[words[0]]
    elif words:
        if bi > -1:
            total += _number_formation(words[0:bi]) * 1000000000
        if mi > -1:
            total += _number_formation(words[bi + 1:mi] if bi > -1 else words[0:mi]) * 1000000
        if th > -1:
            if mi > -1:
                total += _number_formation(words[mi + 1:th]) * 1000
            elif bi > -1:
                total += _number_formation(words[bi + 1:th]) * 1000
            else:
                total += _number_formation(words[0:th]) * 1000
        last = len(words) - 1
        if th > -1 and th != last:
            total += _number_formation(words[th + 1:])
        elif mi > -1 and mi != last:
            total += _number_formation(words[mi + 1:])
        elif bi > -1 and bi != last:
            total += _number_formation(words[bi + 1:])
        elif th == -1 and mi == -1 and bi == -1:
            total += _number_formation(words)
    if decimals:
        if all(w in _DECIMAL_WORDS for w in decimals):
            total += float("0." + "".join(str(_W2N[w]) for w in decimals))
    return total


def _number(text: str) -> str:
    match = _find_match(NUMBER_RE, text)
    if not match:
        match = _find_match(ENGLISH_NUMBER_RE, text.lower())
        if match:
            try:
                match = str(_word_to_num(match))
            except (ValueError, IndexError):  # the harness crashes here; we call it invalid
                match = ""
    return match or FALLBACK


def _map_regex(text: str, mapping: dict[str, str]) -> str:
    whole = _find_match(re.compile("|".join(mapping)), text.lower())
    if whole:
        for pattern, value in mapping.items():
            if _find_match(re.compile(pattern), whole.lower()):
                return value
    return FALLBACK


def _word_sort(text: str, question: str | None) -> str:
    if question is None:
        raise ValueError("bbh word_sorting needs the question (its word list) to extract an answer")
    words = question.split("List:")[1].strip().split()
    regex = re.compile("|".join(f"\\b{w}\\b" for w in words))
    found = regex.findall(text)
    last_occurrence_order = list(dict.fromkeys(reversed(found)))
    return " ".join(reversed(last_occurrence_order))


# --- public filters -------------------------------------------------------------------------------
def gsm8k_strict(text: str) -> str:
    """``gsm8k_cot_zeroshot`` strict-match: the first ``The answer is N.`` or ``"[invalid]"``."""
    return _regex_filter(GSM8K_STRICT_RE, text, 0)


def gsm8k_flexible(text: str) -> str:
    """``gsm8k_cot_zeroshot`` flexible-extract: the last number-like token or ``"[invalid]"``."""
    return _regex_filter(GSM8K_FLEXIBLE_RE, text, -1)


def bbh_strict(text: str, task: str) -> str:
    """``bbh_cot_fewshot`` get-answer (same for every task): text after ``the answer is ``."""
    _task_name(task)
    return _regex_filter(BBH_STRICT_RE, text, 0)


def bbh_flexible(text: str, task: str, question: str | None = None) -> str:
    """``bbh_cot_zeroshot`` flexible-extract of ``task``; ``question`` is the doc's ``input``."""
    kind = _TASK_TYPES[_task_name(task)]
    if not isinstance(text, str):
        text = ""
    if kind == "multiple_choice":
        return _multiple_choice(text, question)
    if kind == "true_false":
        return _regex_filter(BOOL_RE, text, -1)
    if kind == "yes_no":
        return _regex_filter(YESNO_RE, text, -1)
    if kind == "valid_invalid":
        return _regex_filter(VALID_RE, text, -1)
    if kind == "dyck":
        return _regex_filter(DYCK_RE, text, -1)
    if kind == "number":
        return _number(text)
    if kind == "map_sports":
        return _map_regex(text, SPORTS_MAP)
    if kind == "map_web_of_lies":
        return _map_regex(text, WEB_OF_LIES_MAP)
    return _word_sort(text, question)


# --- metric ------------------------------------------------------------------------------------
def _em_normalise(s: str, regexes_to_ignore, ignore_case: bool, ignore_punctuation: bool) -> str:
    # Mirrors exact_match_hf_evaluate on a one-element numpy str array: every numpy round trip
    # drops trailing NULs, and np.char.lower truncates to the array's width.
    width = len(s)
    for pattern in regexes_to_ignore or ():
        s = re.sub(pattern, "", s)
        width = len(s)
        s = s.rstrip("\x00")
    s = s.rstrip("\x00")
    if ignore_case:
        s = s.lower()[:width].rstrip("\x00")
    if ignore_punctuation:
        s = s.translate(str.maketrans("", "", string.punctuation)).rstrip("\x00")
    return s


def exact_match(prediction: str, reference: str, *, regexes_to_ignore=None,
                ignore_case: bool = False, ignore_punctuation: bool = False) -> bool:
    """The harness's ``exact_match`` (``exact_match_hf_evaluate``) on one item."""
    opts = (regexes_to_ignore, ignore_case, ignore_punctuation)
    return _em_normalise(prediction, *opts) == _em_normalise(reference, *opts)


def harness_scores(dataset: str, text: str, target: str, *, task: str | None = None,
                   question: str | None = None) -> dict:
    """Harness strict/flexible exact-match decisions for one model output.

    ``dataset`` is ``"gsm8k"`` (``target``: the final number, or the full answer with
    ``"#### "``) or ``"bbh"`` (``task`` required; ``target`` as in the dataset, e.g. ``"(B)"``;
    ``question``: the doc's ``input``, used by the multiple-choice and word_sorting filters).
    """
    target = target if isinstance(target, str) else str(target)
    if dataset == "gsm8k":
        strict, flexible = gsm8k_strict(text), gsm8k_flexible(text)
        strict_em = flexible_em = GSM8K_EM
    elif dataset == "bbh":
        if task is None:
            raise ValueError("harness_scores('bbh', ...) needs task=")
        strict, flexible = bbh_strict(text, task), bbh_flexible(text, task, question)
        strict_em, flexible_em = BBH_STRICT_EM, BBH_FLEXIBLE_EM
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected 'gsm8k' or 'bbh'")
    return {
        "strict": exact_match(strict, target, **strict_em),
        "flexible": exact_match(flexible, target, **flexible_em),
        "extracted": {"strict": strict, "flexible": flexible},
    }

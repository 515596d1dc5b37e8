"""slmkd.scoring.harness against lm-evaluation-harness's own filters and exact_match metric.

The harness side is built from the installed task YAMLs (``lm_eval.tasks._yaml_loader.load_yaml``
resolves ``include`` and ``!function``), the filter pipelines with
``lm_eval.filters.build_filter_ensemble`` exactly as ``ConfigurableTask`` does, and scored with the
registered ``exact_match`` metric and the YAML's metric kwargs.  Outputs come from seeded random
templates; every item must agree.
"""

from __future__ import annotations

import json
import random
import re
from functools import cache
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_metric  # noqa: E402
from lm_eval.filters import build_filter_ensemble  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from slmkd.scoring import harness as H  # noqa: E402
from slmkd.scoring.harness import (  # noqa: E402
    BBH_TASKS,
    FALLBACK,
    bbh_flexible,
    bbh_strict,
    gsm8k_flexible,
    gsm8k_strict,
    harness_scores,
)

TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"
SHARED_BBH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbh" / "tasks"
N_PER_TASK = 24  # synthetic BBH outputs per task (27 tasks)
N_GSM8K = 450


# --- the harness side ---------------------------------------------------------------------------
class Harness:
    """One task's filter pipelines and exact_match kwargs, as lm_eval builds them."""

    def __init__(self, yaml_path: Path):
        self.cfg = load_yaml(yaml_path)
        self.pipelines = {}
        for f in self.cfg["filter_list"]:
            components = [[c["function"], {k: v for k, v in c.items() if k != "function"}]
                          for c in f["filter"]]
            self.pipelines[f["name"]] = build_filter_ensemble(f["name"], components)
        (metric,) = [m for m in self.cfg["metric_list"] if m["metric"] == "exact_match"]
        self.em_kwargs = {k: v for k, v in metric.items()
                          if k not in ("metric", "aggregation", "higher_is_better", "hf_evaluate")}
        self.metric = get_metric("exact_match")

    def extract(self, name: str, text: str, doc: dict):
        inst = Instance(request_type="generate_until", doc=doc, arguments=("", {}), idx=0)
        inst.resps = [text]
        self.pipelines[name].apply([inst])
        return inst.filtered_resps[name]

    def correct(self, result: str, gold: str) -> bool:
        score = self.metric(references=[gold], predictions=[result], **self.em_kwargs)
        return bool(score["exact_match"])


@cache
def gsm8k_harness() -> Harness:
    return Harness(TASKS_DIR / "gsm8k" / "gsm8k-cot-zeroshot.yaml")


@cache
def bbh_harness(task: str, variant: str) -> Harness:
    return Harness(TASKS_DIR / "bbh" / variant / f"{task}.yaml")


def harness_bbh(task: str, text: str, doc: dict):
    """(strict extracted, strict ok, flexible extracted, flexible ok); flexible None on a crash."""
    few, zero = bbh_harness(task, "cot_fewshot"), bbh_harness(task, "cot_zeroshot")
    strict = few.extract("get-answer", text, doc)
    try:
        flexible = zero.extract("flexible-extract", text, doc)
    except (ValueError, IndexError):  # word2number raising inside NumberParseRegexFilter
        flexible = None
    gold = doc["target"]
    return (strict, few.correct(strict, gold), flexible,
            None if flexible is None else zero.correct(flexible, gold))


# --- output generators ---------------------------------------------------------------------------
def _number(rng: random.Random) -> str:
    kind = rng.choice(["int", "int", "neg", "dec", "comma", "big", "zero", "dec0"])
    if kind == "int":
        return str(rng.randint(1, 999))
    if kind == "neg":
        return str(-rng.randint(1, 99))
    if kind == "dec":
        return f"{rng.randint(0, 99)}.{rng.randint(1, 99)}"
    if kind == "dec0":
        return f"{rng.randint(1, 99)}.00"
    if kind == "comma":
        return f"{rng.randint(1, 99)},{rng.randint(0, 999):03d}"
    if kind == "big":
        return str(rng.randint(1000, 999999))
    return "0"


GSM8K_FINALS = [
    "The answer is {n}.", "The answer is {n}", "The answer is ${n}.", "The answer is **{n}**.",
    "**{n}**", "Answer: {n}", ": {n}", "The answer is \\boxed{{{n}}}.", "\\boxed{{{n}}}",
    "the answer is {n}.", "THE ANSWER IS {n}.", "The answer is {n}.\n\nQ: next question",
    "The answer is {n}\n", "#### {n}", "So {n} in total.", "The answer is {n} dollars.",
    "The answer is: {n}.", "The answer is {n}...", "{n}", "The answer is {n}.\x00",
    "The answer is {n}, not {m}.", "The answer is {m}. Wait, the answer is {n}.",
    "The answer is ${n}", "The answer is {n}!", "The answer is  {n}.", "The answer is -{n}.",
]
GSM8K_SPECIAL = [
    "", "I don't know.", "garbage !!@# ~~", "The answer is .", "The answer is -.", "İİ 5",
    "The answer is eighteen.", "Hmm... not sure...", "1, 2, 3, ...", "$$", "-", "--5",
    "The answer is 1.2.3.", "The answer is 5,", "Total: 7 apples and 8 pears", "\n\n", "#### ",
]


def _reasoning(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 3)):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        parts.append(rng.choice([
            f"{a} + {b} = {a + b}.", f"She has {a} apples and buys {b} more.",
            f"That costs ${a}.{b:02d} each.", f"Step {a}: multiply by {b}.", "Let me think...",
            f"{a},{b:03d} people came.", f"The temperature was -{a} degrees.",
        ]))
    return " ".join(parts) + (" " if parts else "")


def gsm8k_cases(n: int, seed: int = 0):
    """(output, gold number string, full GSM8K-style answer) triples."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        num, other = _number(rng), _number(rng)
        if i % 9 == 8:
            text = rng.choice(GSM8K_SPECIAL)
        else:
            text = _reasoning(rng) + rng.choice(GSM8K_FINALS).format(n=num, m=other)
        gold_kind = rng.random()
        if gold_kind < 0.55:
            gold = num.replace(",", "") if rng.random() < 0.5 else num
        elif gold_kind < 0.7:
            gold = re.sub(r"\.0+$", "", num.replace(",", "").replace("-", ""))
        else:
            gold = other
        full = f"She has 3 + 4 = <<3+4=7>>7 apples.\nSo $1,000 total.\n#### {gold}"
        cases.append((text, gold, full))
    return cases


BBH_FINALS = [
    "So the answer is {a}.", "So the answer is {a}", "So the answer is {a}.\n", "The answer is {a}.",
    "the answer is {a}", "Answer: {a}", "{a}", "The final answer: {a}.", "So the answer is {a}. Q: x",
    "the answer is {a}..", 'So the answer is "{a}".', "So the answer is {a},", "So the answer is {a}!",
    "Therefore, the answer is {a}.\n\nthe answer is {b}.", "So the answer is {a}.\nExplanation done",
    "I think {a}, not {b}.", "the answer is: {a}.", "So the answer is {a}\\.", "{a}.\x00",
    "So the answer is **{a}**.",
]
BBH_SPECIAL = ["", "garbage !!@# ~~", "I cannot answer.", "So the answer is .", "\n", "İİ",
               "So the answer is ", "the answer is x"]

SYNTH_MC = [
    "Which ball is it?\nOptions:\n(A) the red ball\n(B) the blue ball\n(C) the green ball",
    "Find a movie similar to Star Wars:\nOptions:\n(A) Guilty\n(B) Guilty of Romance\n"
    "(C) Monsters, Inc\n(D) The Matrix",
    "Which is the date?\nOptions:\n(A) 12/31/2021\n(B) 01/01/2022\n(C) 12/30/2021\n(D) 01/02/2022\n"
    "(E) 11/30/2021\n(F) 12/31/2020",
    "Pick one:\nOptions:\n(A) Yes\n(B) yes!\n(C) \n(D) no (really)\n(E) İstanbul",
    "Which sentence is sarcastic?\nOptions:\n(A) Wow, great job - really.\n(B) Great job.",
]
SYNTH_DYCK = [("Complete the rest of the sequence: [ ( {", "} ) ]"), ("Complete: < [", "] >"),
              ("Complete: ( ( ( )", ") )")]
SYNTH_WORDS = [
    "Sort the following words alphabetically: List: pear apple it&t it o'connor banana",
    "Sort the following words alphabetically: List: zebra yak xylophone",
    "Sort the following words alphabetically: List: one two two three",
]

ANSWERS = {
    "true_false": ["True", "False", "true", "false", "not True", "TRUE", "True or False"],
    "yes_no": ["Yes", "No", "yes", "no", "YES", "Yes, it is", "Nope", "no. Yes"],
    "valid_invalid": ["valid", "invalid", "Valid", "Invalid", "not valid", "invalid. It is valid"],
    "number": ["12", "-7", "twelve", "twenty six", "one hundred and five", "none", "fourteen",
               "three thousand two hundred", "seven", "forty-two", "trillion",
               "one million thousand", "thousand thousand", "-", "12.5", "1,234", "eighteen",
               "sixty", "ten or eleven", "zero"],
    "map_sports": ["yes", "no", "plausible", "not plausible", "implausible", "Plausible",
                   "Not plausible", "Yes", "No", "plausible, but no"],
    "map_web_of_lies": ["Yes", "No", "tells the truth", "does not tell the truth",
                        "is not telling the truth", "is telling the truth", "lies", "yes"],
}
TARGETS = {"true_false": ["True", "False"], "yes_no": ["Yes", "No"],
           "valid_invalid": ["valid", "invalid"], "number": ["12", "-7", "105", "1", "26", "0"],
           "map_sports": ["yes", "no"], "map_web_of_lies": ["Yes", "No"]}


def _mc_answers(question: str, rng: random.Random) -> list[str]:
    options = re.findall(r"\(([A-Z])\)([^\n^(]*)", question)
    letters = [x for x, _ in options] or ["A", "B"]
    texts = [t.strip() for _, t in options if t.strip()] or ["something"]
    x, y = rng.choice(letters), rng.choice(letters)
    t = rng.choice(texts)
    return [f"({x})", x, f"({x}) or ({y})", t, t.lower(), t.upper(), f"{t}!", f"({x}) {t}",
            f"**{x}**", f": {x}", f"Answer: {x}", "(Z)", f"option {x}", f"{t} or {rng.choice(texts)}",
            f"the {t.lower().rstrip('.')}", f"{x})"]


def _dyck_answers(target: str) -> list[str]:
    return [target, target.replace(" ", ""), f'"{target}"', target + " .", f"[ ( {target}",
            "the sequence is closed", target.replace(" ", ", "), f"{target} {target}"]


def _word_answers(question: str, rng: random.Random) -> list[str]:
    words = question.split("List:")[1].split()
    ordered = sorted(words)
    shuffled = words[:]
    rng.shuffle(shuffled)
    return [" ".join(ordered), ", ".join(ordered), " ".join(shuffled), " ".join(ordered + ordered[:1]),
            " ".join(ordered[:-1]), " ".join(w.capitalize() for w in ordered),
            "The sorted list: " + " > ".join(ordered), "words: " + " ".join(reversed(ordered))]


def synthetic_docs(task: str) -> list[dict]:
    kind = H.task_type(task)
    if kind == "multiple_choice":
        synth = [{"input": q, "target": f"({c})"} for q, c in zip(SYNTH_MC, "ABCDA")]
    elif kind == "dyck":
        synth = [{"input": q, "target": t} for q, t in SYNTH_DYCK]
    elif kind == "word_sort":
        synth = [{"input": q, "target": " ".join(sorted(q.split("List:")[1].split()))}
                 for q in SYNTH_WORDS]
    else:
        synth = [{"input": f"Question about {task}?", "target": t} for t in TARGETS[kind]]
    return synth


def bbh_cases(task: str, docs: list[dict], n: int, seed: int, *, swap_targets: bool = True):
    """(output, doc) pairs for one task, cycling over ``docs``."""
    kind = H.task_type(task)
    rng = random.Random(f"{seed}-{task}")
    cases = []
    for i in range(n):
        doc = docs[i % len(docs)]
        if kind == "multiple_choice":
            pool = _mc_answers(doc["input"], rng)
        elif kind == "dyck":
            pool = _dyck_answers(doc["target"])
        elif kind == "word_sort":
            pool = _word_answers(doc["input"], rng)
        else:
            pool = ANSWERS[kind]
        a, b = rng.choice(pool), rng.choice(pool)
        if rng.random() < 0.35:  # the right answer, so that both decisions are often True
            a = doc["target"] if rng.random() < 0.8 else doc["target"].strip("()")
        if i % 11 == 10:
            text = rng.choice(BBH_SPECIAL)
        else:
            lead = rng.choice(["", "Let's think step by step. ", "First, (A) is ruled out: ",
                               "Step 1: it is true that no one lies. ", "Hmm... "])
            text = lead + rng.choice(BBH_FINALS).format(a=a, b=b)
        if swap_targets and kind in TARGETS and rng.random() < 0.3:
            doc = {**doc, "target": rng.choice(TARGETS[kind])}
        cases.append((text, doc))
    return cases


def _real_docs(task: str, k: int = 2) -> list[dict]:
    path = SHARED_BBH / f"{task}.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text())["examples"][:k]


# --- agreement --------------------------------------------------------------------------------------
def test_gsm8k_agrees_with_harness():
    h = gsm8k_harness()
    cases = gsm8k_cases(N_GSM8K)
    assert len(cases) >= 300
    outcomes = set()
    for text, gold, full in cases:
        strict = h.extract("strict-match", text, {"answer": full})
        flexible = h.extract("flexible-extract", text, {"answer": full})
        want = {"strict": h.correct(strict, full), "flexible": h.correct(flexible, full),
                "extracted": {"strict": strict, "flexible": flexible}}
        for target in (gold, full):
            got = harness_scores("gsm8k", text, target)
            assert got == want, (text, target)
        assert gsm8k_strict(text) == strict and gsm8k_flexible(text) == flexible
        outcomes.add((want["strict"], want["flexible"]))
    assert {(True, True), (False, True), (False, False)} <= outcomes


def _check_bbh(cases, task):
    crashes, outcomes = 0, set()
    for text, doc in cases:
        strict, strict_ok, flexible, flexible_ok = harness_bbh(task, text, doc)
        got = harness_scores("bbh", text, doc["target"], task=task, question=doc["input"])
        if flexible is None:  # the harness crashes; we call the output invalid
            crashes += 1
            flexible = FALLBACK
            flexible_ok = H.exact_match(FALLBACK, doc["target"], **H.BBH_FLEXIBLE_EM)
        want = {"strict": strict_ok, "flexible": flexible_ok,
                "extracted": {"strict": strict, "flexible": flexible}}
        assert got == want, (task, text, doc)
        outcomes.add((strict_ok, flexible_ok))
    return crashes, outcomes


def test_bbh_agrees_with_harness_every_task():
    assert len(BBH_TASKS) == 27
    total, crashes, outcomes = 0, 0, set()
    for task in BBH_TASKS:
        cases = bbh_cases(task, synthetic_docs(task), N_PER_TASK, seed=1)
        c, o = _check_bbh(cases, task)
        total, crashes, outcomes = total + len(cases), crashes + c, outcomes | o
    assert total >= 300
    assert crashes > 0  # the word2number crash cases were exercised
    assert {(True, True), (False, True), (False, False)} <= outcomes


@pytest.mark.skipif(not SHARED_BBH.is_dir(),
                    reason="../shared/data/bbh (real BBH questions) is not beside this checkout")
def test_bbh_agrees_with_harness_on_real_questions():
    total = 0
    for task in BBH_TASKS:
        real = _real_docs(task, 3)
        assert real, task
        cases = bbh_cases(task, real, 4 * len(real), seed=2, swap_targets=False)
        _check_bbh(cases, task)
        total += len(cases)
    assert total >= 300


# --- the reproduced settings are the YAMLs' ---------------------------------------------------------
def _defaults(kwargs: dict) -> dict:
    return {"ignore_case": False, "ignore_punctuation": False, "regexes_to_ignore": None, **kwargs}


def test_settings_match_the_yamls():
    g = gsm8k_harness()
    assert _defaults(g.em_kwargs) == H.GSM8K_EM
    (strict_fn, _), (flex_fn, _) = [f["filter"] for f in g.cfg["filter_list"]]
    assert strict_fn["regex_pattern"] == H.GSM8K_STRICT_RE.pattern
    assert flex_fn["regex_pattern"] == H.GSM8K_FLEXIBLE_RE.pattern and flex_fn["group_select"] == -1
    by_kind = {"true_false": H.BOOL_RE, "yes_no": H.YESNO_RE, "valid_invalid": H.VALID_RE,
               "dyck": H.DYCK_RE}
    maps = {"map_sports": H.SPORTS_MAP, "map_web_of_lies": H.WEB_OF_LIES_MAP}
    yaml_tasks = sorted(p.stem for p in (TASKS_DIR / "bbh" / "cot_zeroshot").glob("[!_]*.yaml"))
    assert yaml_tasks == list(BBH_TASKS)
    for task in BBH_TASKS:
        few, zero = bbh_harness(task, "cot_fewshot"), bbh_harness(task, "cot_zeroshot")
        assert _defaults(few.em_kwargs) == H.BBH_STRICT_EM
        assert _defaults(zero.em_kwargs) == H.BBH_FLEXIBLE_EM
        (get_answer,) = few.cfg["filter_list"]
        assert get_answer["filter"][0]["regex_pattern"] == H.BBH_STRICT_RE.pattern
        assert [c["function"] for c in get_answer["filter"]] == ["regex", "take_first"]
        (flex,) = [f for f in zero.cfg["filter_list"] if f["name"] == "flexible-extract"]
        first, second = flex["filter"]
        assert second == {"function": "take_first"}
        fn, kind = first["function"], H.task_type(task)
        fn_name = fn if isinstance(fn, str) else fn.__name__
        args = {k: v for k, v in first.items() if k != "function"}
        if kind == "multiple_choice":
            assert fn_name == "MultiChoiceRegexFilter"
            assert args == {"group_select": -1, "ignore_case": True, "ignore_punctuation": True,
                            "regex_pattern": H.MC_RE.pattern}
        elif kind == "number":
            assert fn_name == "NumberParseRegexFilter"
            assert args == {"group_select": -1, "regex_pattern": H.NUMBER_RE.pattern}
        elif kind in maps:
            assert fn_name == "MapRegexFilter"
            assert args == {"group_select": -1, "ignore_case": True,
                            "regex_pattern_to_value": maps[kind]}
        elif kind == "word_sort":
            assert fn_name == "WordSortFilter" and args == {}
        else:
            assert fn_name == "regex"
            assert args == {"group_select": -1, "regex_pattern": by_kind[kind].pattern}


def test_english_number_regex_matches_the_regex_module():
    regex = pytest.importorskip("regex")
    import inspect

    cfg = bbh_harness("object_counting", "cot_zeroshot").cfg
    (flex,) = [f for f in cfg["filter_list"] if f["name"] == "flexible-extract"]
    src = inspect.getsource(flex["filter"][0]["function"])
    pattern = re.search(r'regex\.compile\(\s*"(.*)"\s*\)', src).group(1)
    pattern = pattern.encode().decode("unicode_escape")
    assert pattern == H._HARNESS_ENGLISH_NUMBER
    theirs = regex.compile(pattern)
    rng = random.Random(3)
    vocab = ["one", "two", "six", "seven", "eight", "eighteen", "eighty", "twenty", "fourteen",
             "hundred", "thousand", "million", "trillion", "and", "&", ",", " ", "\t", "\x1c",
             "\xa0", "\u2003", "\n", "none", "tone", "often", "x", "-", "nine", "ninety", "teen"]
    for _ in range(3000):
        s = "".join(rng.choice(vocab) + rng.choice(["", " "]) for _ in range(rng.randint(1, 8)))
        assert H.ENGLISH_NUMBER_RE.findall(s) == theirs.findall(s), repr(s)


# --- documented cases (expected values taken from the harness itself) -------------------------------
@pytest.mark.parametrize("text,strict,flexible", [
    ("The answer is 18.", "18", "18."),
    ("The answer is 18", "1", "18"),       # the pattern's trailing "." is "any character"
    ("The answer is 18\n", "1", "18"),
    ("The answer is $18.", FALLBACK, "$18."),
    ("**18**", FALLBACK, "18"),
    ("The answer is \\boxed{18}.", FALLBACK, "18"),
    ("I think 12, no 13. The answer is 1,000.", "1,000", "1,000."),
    ("Hmm...", FALLBACK, "..."),
    ("", FALLBACK, FALLBACK),
])
def test_gsm8k_documented(text, strict, flexible):
    h = gsm8k_harness()
    doc = {"answer": "x\n#### 18"}
    assert h.extract("strict-match", text, doc) == strict == gsm8k_strict(text)
    assert h.extract("flexible-extract", text, doc) == flexible == gsm8k_flexible(text)


def test_gsm8k_documented_scores():
    assert harness_scores("gsm8k", "The answer is 18", "18") == {
        "strict": False, "flexible": True, "extracted": {"strict": "1", "flexible": "18"}}
    assert harness_scores("gsm8k", "The answer is $1,000.", "1,000")["flexible"] is True
    assert harness_scores("gsm8k", "The answer is 18.00.", "18")["strict"] is False
    with pytest.raises(ValueError):
        harness_scores("math", "x", "1")


@pytest.mark.parametrize("task,text,strict,flexible", [
    ("snarks", "So the answer is (B).", "(B)", "(B)"),
    ("snarks", "So the answer is (B)", "(B", "(B)"),
    ("snarks", "The answer is (B).", FALLBACK, "(B)"),
    ("snarks", "So the answer is .", "", FALLBACK),
    ("snarks", "It is (A) or (B)", FALLBACK, "(B)"),
    ("boolean_expressions", "not True is False. So the answer is True.", "True", "True"),
    ("navigate", "Yes... so no", FALLBACK, "no"),
    ("formal_fallacies", "the answer is invalid.", "invalid", "invalid"),
    ("dyck_languages", "So the answer is ] ) }.", "] ) }", "] ) }"),
    ("dyck_languages", "So the answer is ] ) }. Done", "] ) }. Don", ""),  # a lone space matches
    ("object_counting", "the answer is 7.", "7", "7"),
    ("object_counting", "I have none left", FALLBACK, "1"),
    ("object_counting", "fourteen", FALLBACK, "4"),
    ("object_counting", "seven hundred", FALLBACK, "100"),
    ("object_counting", "step-by-step", FALLBACK, "-"),
    ("sports_understanding", "This is not plausible.", FALLBACK, "no"),
    ("web_of_lies", "So Bob tells the truth.", FALLBACK, "yes"),
])
def test_bbh_documented(task, text, strict, flexible):
    doc = {"input": "Q?\nOptions:\n(A) first\n(B) second", "target": "(B)"}
    few, zero = bbh_harness(task, "cot_fewshot"), bbh_harness(task, "cot_zeroshot")
    assert few.extract("get-answer", text, doc) == strict == bbh_strict(text, task)
    assert zero.extract("flexible-extract", text, doc) == flexible
    assert bbh_flexible(text, task, doc["input"]) == flexible


def test_bbh_multiple_choice_option_text():
    q = SYNTH_MC[1]
    zero = bbh_harness("movie_recommendation", "cot_zeroshot")
    for text, want in [("I pick guilty of romance!", "(B)"), ("Guilty, definitely", "(A)"),
                       ("monsters inc", "(C)"), ("Answer: D", "(D)"), ("nothing", FALLBACK)]:
        assert zero.extract("flexible-extract", text, {"input": q}) == want
        assert bbh_flexible(text, "movie_recommendation", q) == want
    # without the question only the "(X)" regex can hit, as for a doc with no options
    assert bbh_flexible("Guilty", "movie_recommendation") == FALLBACK
    assert zero.extract("flexible-extract", "Guilty", {"input": ""}) == FALLBACK


def test_bbh_word_sorting_and_crash_cases():
    q = SYNTH_WORDS[0]
    zero = bbh_harness("word_sorting", "cot_zeroshot")
    text = "apple banana, then it&t, it, apple again; pear"
    assert bbh_flexible(text, "word_sorting", q) == zero.extract("flexible-extract", text, {"input": q})
    with pytest.raises(ValueError):
        bbh_flexible(text, "word_sorting")
    crash = bbh_harness("object_counting", "cot_zeroshot")
    for text in ("trillion", "one million thousand", "thousand thousand"):
        with pytest.raises((ValueError, IndexError)):
            crash.extract("flexible-extract", text, {"input": ""})
        assert bbh_flexible(text, "object_counting") == FALLBACK


def test_exact_match_numpy_quirks():
    metric = get_metric("exact_match")
    pairs = [("İ", "i̇"), ("İ", "i"), ("abc\x00", "abc"), ("18.\x00", "18"), ("A", "a"),
             ("İa", "i̇"), ("x\x00.", "x"), ("ẞ", "ß")]
    for kwargs in (H.GSM8K_EM, H.BBH_FLEXIBLE_EM, H.BBH_STRICT_EM,
                   {"ignore_case": True, "ignore_punctuation": True, "regexes_to_ignore": None}):
        for p, r in pairs:
            want = bool(metric(predictions=[p], references=[r], **kwargs)["exact_match"])
            assert H.exact_match(p, r, **kwargs) == want, (p, r, kwargs)


def test_task_names():
    assert bbh_strict("the answer is (A).", "bbh_cot_fewshot_snarks") == "(A)"
    assert H.task_type("bbh_cot_zeroshot_word_sorting") == "word_sort"
    with pytest.raises(ValueError):
        bbh_strict("x", "not_a_task")
    with pytest.raises(ValueError):
        harness_scores("bbh", "x", "(A)")

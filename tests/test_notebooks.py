"""Static checks of the numbered notebooks (nbmake executes them separately, in CI)."""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

from slmkd.links import REPO, colab_badge, colab_url, fix_notebook_badges
from slmkd.notebook import fast_mode, notebook_config
from slmkd.preflight import MissingInputError, require

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["00_setup", "01_teacher_cot", "02_kd_logits", "03_cascod", "04_evaluate", "05_report"]


def _load(name: str) -> dict:
    return json.loads((NB_DIR / f"{name}.ipynb").read_text(encoding="utf-8"))


def _src(cell: dict) -> str:
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


def _code_without_comments(src: str) -> str:
    toks = tokenize.generate_tokens(io.StringIO(src).readline)
    return " ".join(t.string for t in toks if t.type not in (tokenize.COMMENT, tokenize.NL))


def test_all_notebooks_present():
    assert sorted(p.stem for p in NB_DIR.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_no_outputs_committed(name):
    nb = _load(name)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{name}: a code cell has outputs"
            assert cell.get("execution_count") is None, f"{name}: execution count committed"
    assert "widgets" not in nb["metadata"], f"{name}: widget state committed"


@pytest.mark.parametrize("name", NAMES)
def test_first_cell_has_badge_from_repo_constant(name):
    first = _load(name)["cells"][0]
    assert first["cell_type"] == "markdown"
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}.ipynb"
    assert url == colab_url(name)
    text = _src(first)
    assert colab_badge(name) in text
    assert re.findall(r"colab\.research\.google\.com/github/[^)\s]+", text) == [url[8:]]
    assert len(text.split("\n\n")) >= 3  # title, badge, one paragraph on what the step does


@pytest.mark.parametrize("name", NAMES)
def test_exactly_one_parameters_cell(name):
    cells = _load(name)["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0]["cell_type"] == "code"
    src = _src(tagged[0])
    tree = ast.parse(src)
    # plain defaults: only imports and assignments (no calls into slmkd, no training)
    assert all(isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign)) for n in tree.body)
    assert 'os.environ.get("SLMKD_PROFILE", "a100-80g")' in src
    assert "SLM_KD_" in src and "load_config" in src  # says who applies the env overrides
    # every cell before the parameters cell is markdown or the install cell
    idx = cells.index(tagged[0])
    assert idx == 2 and cells[1]["cell_type"] == "code"


@pytest.mark.parametrize("name", NAMES)
def test_install_cell_is_colab_only_and_never_installs_torch(name):
    cell = _load(name)["cells"][1]
    src = _src(cell)
    tree = ast.parse(src)
    ifs = [n for n in tree.body if isinstance(n, ast.If)]
    assert len(ifs) == 1 and ast.unparse(ifs[0].test) == "'google.colab' in sys.modules"
    # the only statements outside the guard are imports and the repository constant
    for n in tree.body:
        assert isinstance(n, (ast.Import, ast.ImportFrom, ast.If, ast.Assign))
    assert f'REPO = "{REPO}"' in src
    code = _code_without_comments(src)
    # torch appears only to pin the installed build while vLLM is installed (pip then picks the
    # vLLM release for it or gives up): never as something to install
    lines = [ln.split("#")[0] for ln in src.splitlines()]
    pin = 'pin = "torch==" + torch.__version__.split("+")[0]'
    assert any(ln.strip() == pin for ln in lines)
    rest = [ln for ln in lines if ln.strip() not in ("import torch", pin)]
    assert not any("torch" in ln for ln in rest), [ln for ln in rest if "torch" in ln]
    assert "pip" in code and "--no-deps" in code  # slmkd's own deps cannot pull a torch in
    assert "!pip" not in src and "%pip" not in src  # plain Python: the guard really guards


@pytest.mark.parametrize("name", NAMES)
def test_cells_are_valid_python_and_short(name):
    cells = _load(name)["cells"]
    for cell in cells:
        if cell["cell_type"] == "code":
            ast.parse(_src(cell))
            assert len(_src(cell).splitlines()) <= 30, f"{name}: a long cell: keep logic in slmkd"
    assert sum(c["cell_type"] == "markdown" for c in cells) >= 3


def test_training_notebooks_explain_the_defaults_and_use_widgets():
    text = "\n".join(_src(c) for c in _load("02_kd_logits")["cells"])
    for needle in ("T²", "clamp", "low-token", "Three seeds", "live_plot=True", "config_panel"):
        assert needle in text
    assert "config_panel" in "\n".join(_src(c) for c in _load("03_cascod")["cells"])


def test_notebooks_name_the_notebook_that_makes_missing_inputs():
    assert 'made_by="01_teacher_cot"' in "".join(_src(c) for c in _load("02_kd_logits")["cells"])
    assert 'made_by="02_kd_logits"' in "".join(_src(c) for c in _load("04_evaluate")["cells"])
    assert 'made_by="04_evaluate"' in "".join(_src(c) for c in _load("05_report")["cells"])


def test_require_raises_a_readable_error(tmp_path):
    with pytest.raises(MissingInputError, match=r"01_teacher_cot\.ipynb"):
        require(tmp_path / "cot", made_by="01_teacher_cot", what="teacher CoT")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="04_evaluate"):
        require(tmp_path / "empty", made_by="04_evaluate")
    (tmp_path / "empty" / "x").write_text("1")
    assert require(tmp_path / "empty", made_by="04_evaluate") == tmp_path / "empty"


def test_fix_badges_rewrites_to_the_constant(tmp_path):
    nb = _load("00_setup")
    nb["cells"][0]["source"] = _src(nb["cells"][0]).replace(REPO, "someone/old")
    (tmp_path / "00_setup.ipynb").write_text(json.dumps(nb))
    assert fix_notebook_badges(tmp_path) == [tmp_path / "00_setup.ipynb"]
    fixed = json.loads((tmp_path / "00_setup.ipynb").read_text())
    assert colab_badge("00_setup") in _src(fixed["cells"][0])
    assert fix_notebook_badges(tmp_path) == []  # idempotent


def test_fast_mode_and_notebook_config(tmp_path, monkeypatch):
    assert fast_mode("tiny", {}) and not fast_mode("a100-80g", {})
    assert not fast_mode("tiny", {"SLMKD_NB_FAST": "0"})
    assert fast_mode("a100-80g", {"SLMKD_NB_FAST": "1"})
    monkeypatch.setenv("SLMKD_DRIVE_ROOT", str(tmp_path))
    monkeypatch.setenv("SLM_KD_MAX_LOGIT_ABS", "30")
    cfg = notebook_config("tiny", {"train.learning_rate": None, "seeds": [7]}, fast=True)
    assert cfg.seeds == [7] and cfg.train.max_steps > 0  # None keeps the profile value
    assert cfg.kd.max_logit_abs == 30.0  # env overrides win
    assert cfg.train.learning_rate == notebook_config("tiny").train.learning_rate

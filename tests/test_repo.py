"""The repository keeps its promises: README quick start, CI command, packaging rules."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [ln.split("#", 1)[0].strip() for ln in block.strip().splitlines()]


def test_readme_quick_start_runs_the_main_job_and_the_ci_test_command():
    main_job, tests = _readme_commands()
    assert main_job.endswith("slmkd run")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "the README's test command must be exactly what .ci/run runs"
    assert "pip install -q torch==2.13.0" in ci  # pinned CPU wheel before the package


def test_torch_has_a_floor_and_no_upper_pin_and_colab_never_installs_torch():
    setup = (ROOT / "setup.py").read_text()
    torch_reqs = re.findall(r'"torch([^"]*)"', setup)
    assert torch_reqs == [">=2.1"]
    colab = (ROOT / "colab_requirements.txt").read_text().splitlines()
    assert not [ln for ln in colab if re.match(r"\s*torch\b", ln)]


def test_extras_are_declared():
    setup = (ROOT / "setup.py").read_text()
    for extra in ('"dev"', '"quant"', '"lora"', '"vllm"'):
        assert extra in setup
    for pkg in ("pytest", "nbmake", "ipykernel", "hypothesis", "ruff", "bitsandbytes", "peft"):
        assert pkg in setup

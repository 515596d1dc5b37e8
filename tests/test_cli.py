import json
import subprocess
import sys

from slmkd.cli import _COMMANDS, build_parser, main


def test_every_stage_ships_a_working_subcommand():
    assert set(_COMMANDS) == {"config", "preflight", "plan", "tiny", "generate-cot", "cache-teacher", "train",
                              "evaluate", "report", "run"}
    parser = build_parser()  # every subcommand's real arguments
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(_COMMANDS)
    for name, p in sub.choices.items():
        assert p.get_default("func") is not None, f"{name} has no handler"


def test_config_command_prints_resolved_json(capsys, monkeypatch):
    monkeypatch.setenv("SLM_KD_LOG_EVERY", "7")
    assert main(["config", "--profile", "a100-40g"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["profile"] == "a100-40g" and cfg["train"]["batch_size"] == 4
    assert cfg["train"]["log_every"] == 7


def test_config_errors_are_clear_not_tracebacks():
    out = subprocess.run([sys.executable, "-m", "slmkd.cli", "config", "--profile", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "slmkd: error: Unknown profile 'nope'" in out.stderr and "Traceback" not in out.stderr


def test_parser_imports_no_stage_and_no_torch():
    """Building the parser and resolving ``slmkd config`` loads neither torch nor a stage."""
    code = ("import sys; from slmkd.cli import build_parser; build_parser(); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('slmkd.training', "
            "'slmkd.evaluation', 'slmkd.teacher', 'slmkd.report', 'slmkd.generation'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_train_without_student_takes_the_profiles_first_student(monkeypatch, tmp_path):
    import slmkd.training

    seen = {}

    def fake_train(cfg, method, student, seed, **kw):
        seen.update(method=method, student=student, seed=seed)
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(slmkd.training, "train", fake_train)
    monkeypatch.setattr("slmkd.pipeline.ensure_tiny_cot", lambda cfg: False)
    assert main(["train", "--method", "sft", "--seed", "3", "--profile", "a100-80g",
                 "--drive-root", str(tmp_path)]) == 2
    assert seen == {"method": "sft", "student": "student_primary", "seed": 3}

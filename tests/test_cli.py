import json
import subprocess
import sys

from slmkd.cli import _COMMANDS, build_parser, main


def test_every_stage_ships_a_working_subcommand():
    assert set(_COMMANDS) == {"config", "preflight", "tiny", "generate-cot", "train",
                              "evaluate", "report", "run"}
    parser = build_parser()  # imports every stage module and adds its real arguments
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(_COMMANDS)
    for name, p in sub.choices.items():
        assert p.get_default("func") is not None, f"{name} has no handler"


def test_config_command_prints_resolved_json(capsys, monkeypatch):
    monkeypatch.setenv("SLM_KD_LOG_EVERY", "7")
    assert main(["config", "--profile", "a100-40g"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["profile"] == "a100-40g" and cfg["train"]["batch_size"] == 2
    assert cfg["train"]["log_every"] == 7


def test_config_errors_are_clear_not_tracebacks():
    out = subprocess.run([sys.executable, "-m", "slmkd.cli", "config", "--profile", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "slmkd: error: Unknown profile 'nope'" in out.stderr and "Traceback" not in out.stderr

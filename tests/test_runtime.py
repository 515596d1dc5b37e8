import json
import os
import sys

import pytest

from slmkd.config import load_config
from slmkd.modeling import model_slug
from slmkd.runtime import (
    atomic_write_json,
    atomic_write_text,
    get_drive_root,
    in_colab,
    pick_device,
    pick_dtype,
)


def test_not_colab_here_and_colab_detected_by_module(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert not in_colab()
    monkeypatch.setitem(sys.modules, "google.colab", object())
    assert in_colab()


def test_drive_root_order(tmp_path, monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.setenv("SLMKD_DRIVE_ROOT", str(tmp_path / "env"))
    assert get_drive_root() == (tmp_path / "env").resolve()
    cfg = load_config(overrides={"drive_root": str(tmp_path / "cfg")}, environ={})
    assert get_drive_root(cfg) == (tmp_path / "cfg").resolve() and (tmp_path / "cfg").is_dir()
    monkeypatch.delenv("SLMKD_DRIVE_ROOT")
    monkeypatch.chdir(tmp_path)
    assert get_drive_root() == (tmp_path / "slmkd_drive").resolve()


def test_cpu_device_and_dtype():
    import torch

    if not torch.cuda.is_available():
        assert pick_device().type == "cpu"
    assert pick_dtype("cpu") == torch.float32


def test_atomic_write_leaves_no_temp_files_and_replaces(tmp_path):
    p = tmp_path / "a" / "b.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_text(p, json.dumps({"x": 2}))
    assert json.loads(p.read_text()) == {"x": 2}
    assert os.listdir(p.parent) == ["b.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "c.json"
    atomic_write_json(p, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_text(p, 123)  # type: ignore[arg-type]  # not a str: write fails
    assert json.loads(p.read_text()) == {"ok": True}
    assert os.listdir(tmp_path) == ["c.json"]


@pytest.mark.parametrize("name,slug", [("Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5-1.5B-Instruct"),
                                       ("/content/x/tiny-qwen2-teacher/", "tiny-qwen2-teacher"),
                                       ("a b:c", "a_b_c")])
def test_model_slug(name, slug):
    assert model_slug(name) == slug

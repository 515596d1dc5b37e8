"""The config panel: starts at the config's values, edits them, stays out of the way headless."""

from __future__ import annotations

import pytest

from slmkd.config import ConfigError, load_config
from slmkd.widgets import ConfigPanel, _resize, config_panel, has_kernel

pytest.importorskip("ipywidgets")


@pytest.fixture()
def cfg(tmp_path):
    return load_config("tiny", overrides={"drive_root": str(tmp_path)}, environ={})


def test_headless_panel_uses_defaults(cfg):
    assert not has_kernel()  # pytest runs without an IPython kernel
    panel = config_panel(cfg)
    assert not panel.active and panel.widget is None
    assert panel.changed() == {}
    assert panel.apply(cfg) is cfg
    v = panel.values()
    assert v.learning_rate == cfg.train.learning_rate
    assert v.temperature_schedule == cfg.kd.temperature_schedule


def test_sliders_start_at_the_parameters(cfg):
    cfg = cfg.replace(**{"train.learning_rate": 3e-4, "kd.temperature_schedule": [4.0, 2.0, 1.0]})
    panel = ConfigPanel(cfg, force=True)
    assert panel.active
    assert panel.lr.value == pytest.approx(3e-4)
    assert [s.value for s in panel.temps] == [4.0, 2.0, 1.0]
    assert [s.value for s in panel.alphas] == cfg.kd.alpha_schedule
    assert panel.batch.value == cfg.train.batch_size
    assert panel.epochs.value == cfg.train.epochs == len(panel.temps)
    assert "GiB" in panel.vram.value  # the live VRAM estimate was computed
    assert panel.changed() == {} and panel.apply(cfg) is cfg


def test_moving_sliders_changes_a_validated_copy(cfg):
    panel = ConfigPanel(cfg, force=True)
    panel.lr.value = 1e-3
    panel.batch.value = 8
    panel.temps[0].value = 3.0
    panel.alphas[2].value = 0.9
    new = panel.apply(cfg)
    assert new is not cfg
    assert new.train.learning_rate == pytest.approx(1e-3)
    assert new.train.batch_size == 8
    assert new.kd.temperature_schedule[0] == pytest.approx(3.0)
    assert new.kd.alpha_schedule[2] == pytest.approx(0.9)
    assert cfg.train.batch_size != 8  # the original is untouched
    assert set(panel.changed()) == {"train.learning_rate", "train.batch_size",
                                    "kd.temperature_schedule", "kd.alpha_schedule"}


def test_epochs_slider_resizes_the_schedules(cfg):
    panel = ConfigPanel(cfg, force=True)
    panel.epochs.value = 5
    assert len(panel.temps) == len(panel.alphas) == 5
    assert panel.temps[4].value == cfg.kd.temperature_schedule[-1]  # repeats the last value
    new = panel.apply(cfg)
    assert new.train.epochs == 5 and len(new.kd.alpha_schedule) == 5
    panel.epochs.value = 1
    assert len(panel.schedule_box.children) == 1
    assert panel.apply(cfg).kd.temperature_schedule == cfg.kd.temperature_schedule[:1]


def test_resize_and_validation():
    assert _resize([1.0, 2.0], 4) == [1.0, 2.0, 2.0, 2.0]
    assert _resize([1.0, 2.0, 3.0], 2) == [1.0, 2.0]
    cfg = load_config("tiny", environ={})
    panel = ConfigPanel(cfg, force=True)
    panel.temps[0].value = 0.5
    panel.alphas[0].value = 1.0
    assert panel.apply(cfg).kd.alpha_schedule[0] == 1.0
    # a config whose schedule length disagrees with epochs is still rejected by validation
    with pytest.raises(ConfigError):
        cfg.replace(**{"train.epochs": 2})

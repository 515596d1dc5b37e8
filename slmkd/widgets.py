"""An ipywidgets panel over the config's training defaults (ipywidgets 7 API, as on Colab).

Sliders: one temperature and one alpha per epoch (the per-epoch KD schedules), the learning rate
(log scale), the number of epochs (adds/removes schedule sliders, new epochs repeat the last
value) and the micro-batch size, with the VRAM estimate of that batch shown live. Every slider
starts at the value in ``cfg``, so a notebook's ``parameters`` cell stays the source of truth::

    panel = config_panel(cfg)     # displays the sliders in a notebook
    cfg = panel.apply(cfg)        # a validated copy with the slider values

Headless (no running kernel, e.g. ``python script.py``, or ipywidgets missing) nothing is shown
and :meth:`ConfigPanel.apply` returns the defaults unchanged. Under nbmake/papermill a kernel does
run, but nobody moves a slider, so the defaults are used as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

LR_MIN_EXP, LR_MAX_EXP = -6.0, -1.0
TEMP_RANGE = (0.5, 8.0)
MAX_EPOCHS = 10


def has_kernel() -> bool:
    """True when running inside an IPython kernel that can host widgets."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _widgets_module() -> Any | None:
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


@dataclass
class PanelValues:
    """The values a panel edits (plain data: what :meth:`ConfigPanel.apply` writes)."""

    learning_rate: float
    epochs: int
    batch_size: int
    temperature_schedule: list[float] = field(default_factory=list)
    alpha_schedule: list[float] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> PanelValues:
        return cls(cfg.train.learning_rate, cfg.train.epochs, cfg.train.batch_size,
                   list(cfg.kd.temperature_schedule), list(cfg.kd.alpha_schedule))

    def overrides(self) -> dict[str, Any]:
        return {"train.learning_rate": float(self.learning_rate),
                "train.epochs": int(self.epochs), "train.batch_size": int(self.batch_size),
                "kd.temperature_schedule": [float(t) for t in self.temperature_schedule],
                "kd.alpha_schedule": [float(a) for a in self.alpha_schedule]}


def _resize(values: list[float], n: int) -> list[float]:
    """Truncate, or extend by repeating the last value (the config's per-epoch convention)."""
    if n <= len(values):
        return list(values[:n])
    return list(values) + [values[-1]] * (n - len(values))


class ConfigPanel:
    """Sliders over :class:`PanelValues`; ``widget`` is None when headless."""

    def __init__(self, cfg: ExperimentConfig, *, force: bool = False, method: str = "kd",
                 student: str | None = None) -> None:
        self.defaults = PanelValues.from_config(cfg)
        self._cfg = cfg
        self.method = method
        self.student = student
        self.widget: Any = None
        self._w = _widgets_module()
        if self._w is not None and (force or has_kernel()):
            self._build()

    @property
    def active(self) -> bool:
        return self.widget is not None

    # -- building -------------------------------------------------------------------------------
    def _build(self) -> None:
        w, d = self._w, self.defaults
        style = {"description_width": "initial"}
        self.lr = w.FloatLogSlider(
            value=d.learning_rate, base=10, min=LR_MIN_EXP, max=LR_MAX_EXP, step=0.05,
            description="learning rate", readout_format=".1e", continuous_update=False,
            style=style)
        self.epochs = w.IntSlider(value=d.epochs, min=1, max=max(MAX_EPOCHS, d.epochs),
                                  description="epochs", continuous_update=False, style=style)
        bmax = max(64, 2 ** math.ceil(math.log2(max(d.batch_size, 1))) * 2)
        self.batch = w.IntSlider(value=d.batch_size, min=1, max=bmax, description="batch size",
                                 continuous_update=False, style=style)
        self.temps: list[Any] = []
        self.alphas: list[Any] = []
        self.schedule_box = w.VBox([])
        self.vram = w.HTML(value="")
        self._set_schedule(d.temperature_schedule, d.alpha_schedule)
        self.epochs.observe(self._on_epochs, names="value")
        self.batch.observe(self._on_batch, names="value")
        self._on_batch(None)
        title = w.HTML(value="<b>Training settings</b> (start at the parameters cell; "
                             "run the next cells after changing them)")
        self.widget = w.VBox([title, self.lr, self.epochs, self.batch, self.vram,
                              w.HTML(value="<b>Per-epoch KD schedule</b> (temperature T, "
                                           "alpha = weight of the KD term)"),
                              self.schedule_box])

    def _slider_pair(self, epoch: int, t: float, a: float) -> tuple[Any, Any]:
        w = self._w
        ts = w.FloatSlider(value=t, min=TEMP_RANGE[0], max=max(TEMP_RANGE[1], t), step=0.1,
                           description=f"T epoch {epoch + 1}", continuous_update=False,
                           readout_format=".1f")
        al = w.FloatSlider(value=a, min=0.0, max=1.0, step=0.05,
                           description=f"alpha epoch {epoch + 1}", continuous_update=False,
                           readout_format=".2f")
        return ts, al

    def _set_schedule(self, temps: list[float], alphas: list[float]) -> None:
        self.temps, self.alphas = [], []
        rows = []
        for i, (t, a) in enumerate(zip(temps, alphas)):
            ts, al = self._slider_pair(i, t, a)
            self.temps.append(ts)
            self.alphas.append(al)
            rows.append(self._w.HBox([ts, al]))
        self.schedule_box.children = tuple(rows)

    def _on_epochs(self, change: Any) -> None:
        n = int(self.epochs.value)
        temps = _resize([s.value for s in self.temps], n)
        alphas = _resize([s.value for s in self.alphas], n)
        self._set_schedule(temps, alphas)

    def _on_batch(self, change: Any) -> None:
        try:
            from slmkd.planner import plan_for_config

            cfg = self._cfg.replace(**{"train.batch_size": int(self.batch.value)})
            plan = plan_for_config(cfg, method=self.method, student=self.student)
            self.vram.value = (f"VRAM estimate at this batch ({self.method}): "
                               f"<b>{plan.estimate.total_gib:.1f} GiB</b>; effective batch "
                               f"{plan.effective_batch}")
        except Exception as e:  # the estimate is informative only; never break the panel
            self.vram.value = f"(no VRAM estimate: {e})"

    # -- reading ----------------------------------------------------------------------------------
    def values(self) -> PanelValues:
        """Current values (the defaults when headless)."""
        if not self.active:
            return PanelValues(**{**self.defaults.__dict__})
        return PanelValues(
            learning_rate=float(self.lr.value), epochs=int(self.epochs.value),
            batch_size=int(self.batch.value),
            temperature_schedule=[round(float(s.value), 4) for s in self.temps],
            alpha_schedule=[round(float(s.value), 4) for s in self.alphas])

    def changed(self) -> dict[str, Any]:
        """Dotted-path overrides that differ from the defaults."""
        new, old = self.values().overrides(), self.defaults.overrides()
        return {k: v for k, v in new.items() if v != old[k]}

    def apply(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """A validated copy of ``cfg`` with the panel's values (``cfg`` itself if nothing moved)."""
        changes = self.changed()
        if not changes:
            return cfg
        return cfg.replace(**changes)

    def _ipython_display_(self) -> None:  # pragma: no cover - needs a front-end
        from IPython.display import display

        if self.widget is not None:
            display(self.widget)
        else:
            print("(widgets unavailable: using the parameters cell's values)")


def config_panel(cfg: ExperimentConfig, *, show: bool = True, force: bool = False,
                 method: str = "kd", student: str | None = None) -> ConfigPanel:
    """Build (and display, with ``show``) a :class:`ConfigPanel` over ``cfg``'s values."""
    panel = ConfigPanel(cfg, force=force, method=method, student=student)
    if show and panel.active:
        from IPython.display import display

        display(panel.widget)
    return panel


__all__ = ["ConfigPanel", "PanelValues", "config_panel", "has_kernel"]

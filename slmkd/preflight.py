"""Pre-flight checks before a long stage: GPU, Drive, versions, overrides, and the VRAM plan.

``preflight(cfg)`` returns a plain dict (JSON-serialisable) and ``print_preflight(report)`` prints
it; ``slmkd preflight [--profile P]`` does both from the command line. :func:`require` is what the
notebooks call to turn a missing input into a message naming the notebook that makes it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmkd.links import REPO, colab_badge, colab_url, pip_url

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

__all__ = [
    "REPO", "colab_badge", "colab_url", "pip_url", "MissingInputError", "require", "preflight",
    "format_preflight", "print_preflight", "gpu_info", "drive_info",
    "package_versions", "env_overrides_in_force",
]

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "slmkd", "peft", "bitsandbytes",
            "vllm")
ENV_PREFIXES = ("SLM_KD_", "SLMKD_")


class MissingInputError(FileNotFoundError):
    """An input of this stage does not exist yet; the message names the notebook that makes it."""


def require(path: str | os.PathLike, made_by: str, what: str | None = None,
            nonempty: bool = True) -> Path:
    """Return ``path`` if it exists (and, for a folder, is not empty); otherwise raise a readable
    :class:`MissingInputError` that says which notebook (or ``slmkd`` command) produces it."""
    p = Path(path)
    ok = p.exists() and (not nonempty or not p.is_dir() or any(p.iterdir()))
    if not ok:
        label = what or p.name
        raise MissingInputError(
            f"Missing input: {label} ({p}) does not exist yet. It is made by notebook "
            f"{made_by}.ipynb — run that notebook first (same Drive root and profile), "
            f"or the equivalent `slmkd` command."
        )
    return p


def gpu_info() -> dict[str, Any] | None:
    """``{name, total_gib, free_gib, capability}`` of CUDA device 0, or None without a GPU."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(0)
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "total_gib": round(total / 2**30, 2),
            "free_gib": round(free / 2**30, 2),
            "capability": f"{props.major}.{props.minor}",
            "bf16": bool(torch.cuda.is_bf16_supported())}


def drive_info(root: str | os.PathLike) -> dict[str, Any]:
    """``{root, writable, free_gib, error}``; writability is checked by writing a probe file."""
    root = Path(root)
    out: dict[str, Any] = {"root": str(root), "writable": False, "free_gib": None, "error": None}
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".preflight-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
        out["writable"] = True
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    try:
        out["free_gib"] = round(shutil.disk_usage(root).free / 2**30, 2)
    except OSError:
        pass
    return out


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when the package is absent)."""
    out: dict[str, str | None] = {}
    for n in names:
        if n == "slmkd":
            from slmkd._version import __version__

            out[n] = __version__
            continue
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def env_overrides_in_force(environ: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Every ``SLM_KD_*`` / ``SLMKD_*`` variable set: its value, the config field it changes (if
    any) and whether slmkd knows it (an unknown ``SLM_KD_*`` name is a typo waiting to bite)."""
    from slmkd.config import ENV_OVERRIDES

    environ = dict(os.environ if environ is None else environ)
    known_plain = {"SLMKD_PROFILE": "profile", "SLMKD_DRIVE_ROOT": "drive_root",
                   "SLMKD_NUM_THREADS": "torch threads (CPU)", "SLMKD_NB_FAST": "notebooks: fast"}
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIXES):
            continue
        if name in ENV_OVERRIDES:
            out[name] = {"value": environ[name], "field": ENV_OVERRIDES[name][0], "known": True}
        elif name in known_plain:
            out[name] = {"value": environ[name], "field": known_plain[name], "known": True}
        else:
            out[name] = {"value": environ[name], "field": None,
                         "known": not name.startswith("SLM_KD_")}
    return out


def teacher_cache_line(cfg: ExperimentConfig, method: str) -> str | None:
    """What the cached-teacher path needs, in one line (None when ``method`` reads no cache):
    the cache's size, k, coverage and completeness on Drive, or that it is missing with its
    planned size and the command that makes it."""
    reads_cache = method == "kd-cached" or (
        method in ("kd", "cascod-kd") and cfg.kd.teacher_source == "cached")
    if not reads_cache:
        return None
    from slmkd.teacher.cache import STATS_FILE, cache_dir

    d = cache_dir(cfg)
    stats_path = d / STATS_FILE
    if stats_path.is_file():
        from slmkd.fileio import read_json

        try:
            st = read_json(stats_path)
        except ValueError:
            st = {}
        if st:
            cov = ", ".join(f"T={t}: {100 * c:.1f}%" for t, c in st.get("coverage", {}).items()
                            if c is not None)
            state = "complete" if st.get("complete") else \
                "INCOMPLETE (rerun `slmkd cache-teacher`)"
            return (f"teacher cache {d}: {st.get('records', 0):,} records + "
                    f"{st.get('rationale_examples', 0):,} rationale examples, "
                    f"{st.get('bytes', 0) / 1e9:.2f} GB ({st.get('bytes_per_token', 0):.0f} "
                    f"B/token), top-{st.get('k')}, coverage {cov}; {state}")
    from slmkd.study_plan import plan_study_budget

    planned = ""
    try:
        gb = plan_study_budget(cfg).drive_final_parts.get("teacher cache", 0.0)
        planned = f" (planned {gb:.2f} GB on Drive)"
    except (ValueError, FileNotFoundError, KeyError):
        pass
    return (f"teacher cache: none in {d} yet{planned}: run `slmkd cache-teacher --profile "
            f"{cfg.profile}` (notebook 01, last section) before {method}")


def preflight(cfg: ExperimentConfig, method: str = "kd", student: str | None = None,
              mount: bool = True) -> dict[str, Any]:
    """Check the machine against ``cfg`` and plan VRAM. Returns a JSON-serialisable dict:

    ``profile, gpu, drive, versions, env, plan, plan_text, warnings``; ``plan`` is
    :meth:`slmkd.planner.VramPlan.to_dict` for ``method`` and ``student`` (default the first of
    ``cfg.students``) compared with the GPU present.
    """
    from slmkd.planner import plan_for_config
    from slmkd.runtime import get_drive_root, in_colab

    warnings: list[str] = []
    gpu = gpu_info()
    try:
        root = get_drive_root(cfg, mount=mount)
        drive = drive_info(root)
    except OSError as e:
        drive = {"root": cfg.drive_root, "writable": False, "free_gib": None, "error": str(e)}
    if not drive["writable"]:
        warnings.append(f"Drive root {drive['root']} is not writable: {drive['error']}")
    elif drive["free_gib"] is not None and drive["free_gib"] < (1 if cfg.is_tiny else 30):
        warnings.append(f"only {drive['free_gib']} GiB free on the Drive root; checkpoints of the "
                        "full profile need ~30 GiB")
    env = env_overrides_in_force()
    for name, info in env.items():
        if not info["known"]:
            warnings.append(f"{name} is set but slmkd does not read it (typo?)")
    versions = package_versions()
    plan_dict: dict[str, Any] | None = None
    plan_text = ""
    try:
        plan = plan_for_config(cfg, method=method, student=student,
                               gpu=(gpu["name"], gpu["total_gib"]) if gpu else None)
        plan_dict, plan_text = plan.to_dict(), plan.summary()
        if gpu and not plan.estimate.fits(gpu["total_gib"] * 2**30):
            rec = min(plan.recommendations, key=lambda r: abs(r.gpu_gib - gpu["total_gib"]))
            warnings.append(f"the configured batch needs ~{plan.estimate.total_gib:.1f} GiB but "
                            f"this GPU has {gpu['total_gib']:.1f} GiB; suggested: {rec.line()}")
    except (ValueError, FileNotFoundError) as e:
        plan_text = f"(no VRAM plan: {e})"
    if gpu is None and not cfg.is_tiny:
        warnings.append("no CUDA GPU: the full profiles need one (Runtime > Change runtime type "
                        "> A100 on Colab), or use profile 'tiny'")
    drift_line = None
    if cfg.models.teacher_load_in_4bit:
        from slmkd.teacher.drift import describe_drift, read_cot_drift

        d = read_cot_drift(cfg)
        drift_line = (describe_drift(d) if d is not None else
                      "4-bit NF4 teacher: drift from full precision not measured yet (`slmkd "
                      "generate-cot` measures it after the CoT; notebook 01)")
    cache_line = teacher_cache_line(cfg, method)
    return {"profile": cfg.profile, "colab": in_colab(), "gpu": gpu, "drive": drive,
            "teacher_4bit_drift": drift_line, "teacher_cache": cache_line,
            "versions": versions, "env": env, "method": method,
            "student": cfg.student_name(student or cfg.students[0]),
            "plan": plan_dict, "plan_text": plan_text, "warnings": warnings}


def format_preflight(report: dict[str, Any]) -> str:
    """A readable multi-line summary of :func:`preflight`'s dict."""
    lines = [f"slmkd pre-flight — profile {report['profile']}"
             + (" (Colab)" if report.get("colab") else "")]
    gpu = report.get("gpu")
    lines.append(f"  GPU:     {gpu['name']} — {gpu['free_gib']:.1f} of {gpu['total_gib']:.1f} GiB "
                 f"free, bf16={'yes' if gpu['bf16'] else 'no'}" if gpu else "  GPU:     none (CPU)")
    d = report["drive"]
    free = f"{d['free_gib']:.1f} GiB free" if d.get("free_gib") is not None else "free space ?"
    lines.append(f"  Drive:   {d['root']} — {'writable' if d['writable'] else 'NOT writable'}, "
                 f"{free}")
    lines.append("  Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    missing = [k for k, v in report["versions"].items() if v is None]
    if missing:
        lines.append("            not installed: " + ", ".join(missing))
    env = report.get("env") or {}
    if env:
        lines.append("  Environment overrides in force:")
        for name, info in env.items():
            target = f" -> {info['field']}" if info["field"] else " (not read by slmkd)"
            lines.append(f"    {name}={info['value']}{target}")
    else:
        lines.append("  Environment overrides: none")
    lines.append(f"  VRAM plan ({report['method']}, student {report['student']}):")
    lines.extend("    " + ln for ln in report["plan_text"].splitlines())
    if report.get("teacher_cache"):
        lines.append(f"  Teacher: {report['teacher_cache']}")
    if report.get("teacher_4bit_drift"):
        lines.append(f"  Teacher: {report['teacher_4bit_drift']}")
    for w in report["warnings"]:
        lines.append(f"  WARNING: {w}")
    return "\n".join(lines)


def print_preflight(report: dict[str, Any]) -> None:
    print(format_preflight(report))

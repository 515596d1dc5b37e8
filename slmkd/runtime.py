"""Runtime helpers: Colab detection, the Drive root, device and dtype, CPU threads.

The atomic file writes live in :mod:`slmkd.fileio` (re-exported here for compatibility)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from slmkd.fileio import atomic_write_json, atomic_write_text, read_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from slmkd.config import ExperimentConfig

DRIVE_ENV = "SLMKD_DRIVE_ROOT"
COLAB_DRIVE_MOUNT = "/content/drive"
COLAB_DRIVE_ROOT = "/content/drive/MyDrive/slmkd"
LOCAL_DRIVE_ROOT = "slmkd_drive"
__all__ = ["atomic_write_json", "atomic_write_text", "read_json", "get_drive_root", "in_colab",
           "local_scratch_dir", "mount_drive", "pick_device", "pick_dtype", "set_cpu_threads"]


def in_colab() -> bool:
    """True inside a Google Colab runtime (checked without importing ``google.colab``)."""
    return "google.colab" in sys.modules or bool(os.environ.get("COLAB_RELEASE_TAG"))


def mount_drive(mount_point: str = COLAB_DRIVE_MOUNT) -> bool:
    """Mount Google Drive on Colab; returns False (and does nothing) elsewhere."""
    if not in_colab():
        return False
    if Path(mount_point, "MyDrive").is_dir():
        return True
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount(mount_point)
    return True


def get_drive_root(cfg: ExperimentConfig | None = None, mount: bool = True) -> Path:
    """The folder every stage reads and writes (created if missing).

    Order: ``cfg.drive_root`` → ``$SLMKD_DRIVE_ROOT`` → on Colab ``/content/drive/MyDrive/slmkd``
    (Drive mounted first) → ``./slmkd_drive``.
    """
    root: str | None = cfg.drive_root if cfg is not None else None
    root = root or os.environ.get(DRIVE_ENV)
    if not root:
        if in_colab():
            if mount:
                mount_drive()
            root = COLAB_DRIVE_ROOT
        else:
            root = LOCAL_DRIVE_ROOT
    path = Path(root).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def local_scratch_dir() -> Path:
    """Fast local disk for checkpoints before they are copied to Drive."""
    base = Path("/content/slmkd_local") if in_colab() else Path(tempfile.gettempdir()) / "slmkd_local"
    base.mkdir(parents=True, exist_ok=True)
    return base


def pick_device() -> torch.device:
    """CUDA if available, else CPU (MPS is not used: bf16/KD kernels are unreliable there)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on Ampere or newer GPUs, fp16 on older GPUs, fp32 on CPU."""
    import torch

    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def set_cpu_threads(n: int | None = None) -> None:
    """Limit intra-op threads (``n`` or ``$SLMKD_NUM_THREADS``): tiny models on a shared CPU run
    several times faster with one thread than with spin-waiting pools. No-op when neither is set."""
    if n is None:
        env = os.environ.get("SLMKD_NUM_THREADS")
        n = int(env) if env else None
    if n:
        import torch

        torch.set_num_threads(n)

"""Checkpoint files (``torch.save`` of plain containers), written atomically, loaded only with
``weights_only=True``. Two kinds:
- training state ``<output>/checkpoints/iter_0001000.pt``: {format: TRAIN_FORMAT, version, model,
  optimizer, scaler, iteration, rng, lr_schedule, extra}; ``<output>/checkpoints/last`` names
  the newest (written by ``detect.training.engine.train_loop``).
- a trained detector ``model_final.pt``: {format: DETECTOR_FORMAT, version, kind, config,
  class_names, category_ids, model, extra}: what ``detect.models.build.load_detector`` reads.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch
from torch import Tensor

from detect.common.fileio import atomic_path

TRAIN_FORMAT = "detect-train-checkpoint"
DETECTOR_FORMAT = "detect-detector"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save``, atomically; a failed write (a full disk) raises ``OSError`` naming ``path``."""
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch reports a failed write as "enforce fail ... unexpected pos"
            free_mb = shutil.disk_usage(tmp.parent).free / 2**20
            raise OSError(errno.EIO, f"could not write the checkpoint (disk full? {free_mb:.0f} MiB free; "
                                     f"torch: {str(e).strip().splitlines()[0]})", str(path)) from None


def load_checkpoint(path: str | Path) -> dict:
    """Load one of our checkpoints with ``weights_only=True``; else ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        with open(path, "rb") as f:
            head = f.read(2)
        if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # torch.save: a zip (or a pickle)
            raise ValueError(f"{path}: not a checkpoint (not a file written by torch.save; "
                             f"a detector checkpoint is a run's model_final.pt)") from None
        if "Weights only load failed" in str(e):  # torch's own advice (load it unsafely) is not ours
            raise ValueError(f"{path}: not a loadable checkpoint: refused, it holds Python objects other than "
                             "tensors and plain containers, which could run code when loaded") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a loadable checkpoint (corrupt or truncated: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (TRAIN_FORMAT, DETECTOR_FORMAT):
        raise ValueError(f"{path}: not a detect checkpoint (no 'format' field of ours)")
    return ckpt


def save_detector_checkpoint(path: str | Path, *, kind: str, config: dict, class_names: list[str],
                             category_ids: list[int], state_dict: dict[str, Tensor],
                             extra: dict | None = None) -> None:
    """Write the inference checkpoint of a trained detector (see the module docstring)."""
    save_checkpoint(path, {
        "format": DETECTOR_FORMAT, "version": FORMAT_VERSION, "kind": kind, "config": config,
        "class_names": list(class_names), "category_ids": [int(c) for c in category_ids],
        "model": {k: v.detach().cpu() for k, v in state_dict.items()}, "extra": extra or {},
    })


def last_checkpoint(output_dir: Path) -> Path | None:
    marker = output_dir / "checkpoints" / "last"
    if not marker.is_file():
        return None
    path = output_dir / "checkpoints" / marker.read_text().strip()
    return path if path.is_file() else None

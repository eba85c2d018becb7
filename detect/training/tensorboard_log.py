"""TensorBoard event files of a training run (``RUN/tb/``), with the optional extra ``.[tb]``.

Every ``log.jsonl`` line (the record) is mirrored here under detectron2's scalar names (``TAGS``),
evaluation under ``bbox/AP`` and ``bbox/AP50`` in percent, as its ``COCOEvaluator``.

    tensorboard --logdir runs/frcn/tb
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
except ImportError:  # the optional extra is not installed
    SummaryWriter = None

TAGS = {"loss": "total_loss", "loss_cls": "loss_cls", "loss_box": "loss_box_reg", "lr": "lr",
        "time_per_iter_s": "time", "max_mem_mb": "max_mem_mb"}
EVAL_TAGS = {"AP": "bbox/AP", "AP50": "bbox/AP50"}  # x100, as detectron2's COCOEvaluator
_said_off = False


class TensorBoardLog:
    """Writes log.jsonl records as scalars at their "iteration", and detectron2's ``eta_seconds``."""

    def __init__(self, log_dir: str | Path, *, max_iter: int, purge_step: int | None = None):
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.max_iter = max_iter

    def write(self, record: dict) -> None:
        step = int(record["iteration"])
        if "eval" in record:
            for key, tag in EVAL_TAGS.items():
                if record["eval"].get(key, -1) >= 0:  # -1: COCO's n/a
                    self.writer.add_scalar(tag, 100.0 * float(record["eval"][key]), step)
        else:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.writer.add_scalar(TAGS.get(key, key), float(value), step)
            if "time_per_iter_s" in record:
                self.writer.add_scalar("eta_seconds", record["time_per_iter_s"] * max(0, self.max_iter - step), step)
        self.writer.flush()  # a killed run keeps what log.jsonl has

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(log_dir: str | Path, *, max_iter: int, start_iter: int = 0) -> TensorBoardLog | None:
    """A ``TensorBoardLog`` in ``log_dir``, or None (said once per process) without tensorboard."""
    global _said_off
    if SummaryWriter is None:
        if not _said_off:
            print("TensorBoard logging is off (the tensorboard package is not installed: pip install "
                  "'.[tb]'); log.jsonl has the training log", file=sys.stderr)
            _said_off = True
        return None
    # a resumed run: TensorBoard hides the earlier files' events from purge_step on (a killed run logged them)
    return TensorBoardLog(log_dir, max_iter=max_iter, purge_step=start_iter + 1 if start_iter else None)


def log_final_eval(log_dir: str | Path, step: int, metrics: dict) -> None:
    """The end-of-training evaluation (metrics.json's "coco") at ``step``, under the eval tags."""
    if SummaryWriter is None:
        return
    log = TensorBoardLog(log_dir, max_iter=step)
    log.write({"iteration": step, "eval": metrics["coco"]})
    log.close()

"""Helpers of the distributed, fault and bad-input tests: tiny data, configs, subprocesses.

- ``make_square_dataset``: seeded COCO datasets of equal-sized images (coloured rectangles and
  discs on noise) with a proposal store of jittered ground truth plus random boxes, written with
  ``write_store`` (no selective search: training tests stay fast). Equal sizes matter for the
  "same effective batch" check: a batch of two images is zero-padded to the larger one, which
  changes the conv features near the border; equal images need no padding.
- ``frcn_config`` / ``rcnn_config``: tiny configs (efficientnet_lite0, 96 px images).
- ``torchrun_cmd`` / ``run_ok``: the ``detect`` command under ``torch.distributed.run`` with 2
  gloo ranks, as a subprocess.
- ``WarmJob`` / ``run_warm`` / ``kill_when`` / ``kill_group``: a ``detect`` job forked from a warm
  server process (cheap to start many times), killed with SIGKILL at a chosen moment.
- ``assert_outputs_intact``: after a kill, every output a later run reads must load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = [{"id": 3, "name": "box"}, {"id": 7, "name": "disc"}]


# ----------------------------------------------------------------------------------------------
# Data and configs
# ----------------------------------------------------------------------------------------------


def make_square_dataset(root: Path, *, num_images: int = 4, size: int = 96, seed: int = 0,
                        name: str = "train") -> tuple[Path, Path, Path]:
    """Write ``root/<name>.json``, ``root/images/<name>_<i>.png`` and the proposal store
    ``root/proposals_<name>``; returns (json, image folder, store). Each image (size x size)
    holds one rectangle (category 3) and one disc (category 7); the store holds 4 jittered
    copies of each gt box and 12 random boxes per image (xyxy pixels)."""
    from detect.proposals.store import write_store

    rng = np.random.default_rng(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, proposals = [], [], []
    for i in range(num_images):
        pixels = rng.normal(120, 20, (size, size, 3)).clip(0, 255).astype(np.uint8)
        x, y = (int(v) for v in rng.integers(2, size // 3, 2))
        w, h = (int(v) for v in rng.integers(size // 4, size // 2, 2))
        cv2.rectangle(pixels, (x, y), (x + w, y + h), (220, 40, 40), -1)
        r = int(rng.integers(size // 10, size // 6))
        cx, cy = (int(v) for v in rng.integers(size - size // 3, size - r - 1, 2))
        cv2.circle(pixels, (cx, cy), r, (40, 40, 220), -1)
        file_name = f"{name}_{i}.png"
        cv2.imwrite(str(image_dir / file_name), pixels[:, :, ::-1])
        images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        boxes = []
        for category, (bx, by, bw, bh) in ((3, (x, y, w, h)), (7, (cx - r, cy - r, 2 * r, 2 * r))):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                "bbox": [float(bx), float(by), float(bw), float(bh)],
                                "area": float(bw * bh), "iscrowd": 0})
            gt = np.array([bx, by, bx + bw, by + bh], np.float64)
            boxes += [gt + rng.uniform(-0.15, 0.15, 4) * [bw, bh, bw, bh] for _ in range(4)]
        for _ in range(12):
            x0, y0 = rng.uniform(0, size - 24, 2)
            boxes.append([x0, y0, x0 + rng.uniform(10, 40), y0 + rng.uniform(10, 40)])
        proposals.append(np.clip(np.array(boxes, np.float32), 0, size))
    json_path = root / f"{name}.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    store = write_store(root / f"proposals_{name}", image_ids=[e["id"] for e in images],
                        boxes_per_image=proposals, meta={},
                        files=[str(image_dir / e["file_name"]) for e in images])
    return json_path, image_dir, store


def _data_section(train: tuple[Path, Path, Path], val: tuple[Path, Path, Path] | None) -> dict:
    data = {"train": {"format": "coco", "path": str(train[0]), "images": str(train[1])},
            "train_proposals": str(train[2])}
    if val is not None:
        data["val"] = {"format": "coco", "path": str(val[0]), "images": str(val[1])}
        data["val_proposals"] = str(val[2])
    return data


def frcn_config(train: tuple[Path, Path, Path], val: tuple[Path, Path, Path] | None = None, **train_options) -> dict:
    """A Fast R-CNN config that trains an iteration in a few tens of ms on one CPU core.

    Dropout is 0: the two setups compared by the distributed tests draw dropout masks from
    different generators (one per process), so dropout would make their weights differ."""
    return {
        "detector": "fast_rcnn",
        "data": _data_section(train, val),
        "proposals": {"mode": "fast", "resize": 96, "resize_side": "longer", "min_size": 8, "top_k": 200},
        "model": {"backbone": "efficientnet_lite0", "weights": "none", "freeze_at": "", "roi_op": "roi_align",
                  "roi_size": 3, "head_dim": 32, "dropout": 0.0},
        "train": {"images_per_batch": 2, "rois_per_image": 16, "scales": [96], "max_size": 96, "flip": True,
                  "lr": 0.02, "max_iter": 6, "steps": [4], "warmup_iters": 2, "amp": False,
                  "checkpoint_period": 2, "log_period": 1, "seed": 0, "num_workers": 0, **train_options},
        "test": {"scale": 96, "max_size": 96, "score_thresh": 0.0, "detections_per_image": 20},
    }


def rcnn_config(train: tuple[Path, Path, Path], val: tuple[Path, Path, Path] | None = None, **rcnn_options) -> dict:
    """A tiny R-CNN config: 48 px crops, 3x3 pool5, 4 fine-tuning steps, and the backbone's own
    ImageNet head (installed offline; random weights give all-zero fc7 features, which the SVM
    stage refuses)."""
    return {
        "detector": "rcnn",
        "data": _data_section(train, val),
        "proposals": {"mode": "fast", "resize": 96, "resize_side": "longer", "min_size": 8, "top_k": 0},
        "model": {"backbone": "efficientnet_lite0", "weights": "default", "freeze_at": "block8", "head_dim": 0,
                  "roi_size": 3, "dropout": 0.0},
        "train": {"checkpoint_period": 2, "log_period": 1, "amp": False, "seed": 0},
        "rcnn": {"crop_size": 48, "context_pad": 6, "ft_batch_size": 8, "ft_fg_per_batch": 2, "ft_max_iter": 4,
                 "ft_steps": [100], "svm_workers": 1, "svm_retrain_limit": 10, "feature_batch_size": 64,
                 **rcnn_options},
        "test": {"score_thresh": 0.0, "detections_per_image": 20},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------
# Subprocesses
# ----------------------------------------------------------------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    """One thread per process (2 cores, 2 ranks), the repository importable, no GPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "CUDA_VISIBLE_DEVICES": "", "PYTHONHASHSEED": "0"}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node=N --master_port=<free> -m detect ...``"""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "detect", *args]


def run_ok(cmd: list[str], *, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` to the end; fail the test with its output unless it exits with 0."""
    proc = subprocess.run(cmd, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{output}"
    return proc


# A fresh ``python -m detect`` spends ~6 s of CPU importing torch and torchvision (torch._dynamo
# comes with torchvision.ops), which would dominate tests that start a job a dozen times. So the
# fault tests fork each job from a "warm" server process that has imported the package and done
# nothing else (multiprocessing's forkserver with preloaded modules): the job is a separate
# process running ``detect.cli.main(argv)`` in its own session, exactly what the command line
# runs, and SIGKILL hits it as it would hit ``python -m detect``. The server never ran torch
# code, so no thread pool is inherited across the fork.
WARM_MODULES = ["torch", "torchvision", "detect.cli"]  # detect.cli imports every stage through detect.commands
# The forkserver skips a preload it cannot import without a word: a stale name must fail here.
assert all(importlib.util.find_spec(name) for name in WARM_MODULES), WARM_MODULES
_warm_context = None


def _cli_child(argv: list[str], log: str, env: dict[str, str]) -> None:
    os.setsid()  # its own process group: kill_group takes its worker processes too
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    from detect.cli import main

    sys.exit(main(argv))


class WarmJob:
    """``detect <argv>`` in a process forked from the warm server; Popen-like poll/wait."""

    def __init__(self, argv: list[str], log: Path, **env: str):
        global _warm_context
        if _warm_context is None:
            import multiprocessing

            _warm_context = multiprocessing.get_context("forkserver")
            _warm_context.set_forkserver_preload(WARM_MODULES)
        self.argv, self.log = list(argv), Path(log)
        job_env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONHASHSEED": "0", **env}
        self.process = _warm_context.Process(target=_cli_child, args=(self.argv, str(log), job_env))
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise TimeoutError(f"detect {' '.join(self.argv)} still running after {timeout} s")
        return self.process.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def run_warm(argv: list[str], log: Path, *, timeout: float = 300, **env: str) -> str:
    """Run ``detect <argv>`` in a warm process to the end; fail with its output unless it exits
    with 0; return its output (stdout and stderr)."""
    job = WarmJob(argv, log, **env)
    code = job.wait(timeout)
    assert code == 0, f"detect {' '.join(argv)} exited with {code}:\n{job.output()[-6000:]}"
    return job.output()


def kill_group(proc) -> None:
    """SIGKILL the process and everything it started (its session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # no group yet (killed before setsid) or already gone
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def kill_when(proc, condition: Callable[[], bool], *, delay_s: float = 0.0, timeout: float = 120) -> bool:
    """Poll ``condition`` every 2 ms; ``delay_s`` after it first holds, SIGKILL the process
    group. Returns False when the process ended before the kill (the point was never reached)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            kill_group(proc)
            raise TimeoutError("the kill condition was not met in time")
        time.sleep(0.002)
    time.sleep(delay_s)
    if proc.poll() is not None:
        return False
    kill_group(proc)
    return True


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def is_temporary(path: Path) -> bool:
    """Work-in-progress names: atomic_path's ``.<name>.<random>.tmp``, ShardWriter's
    ``.shard_k.tmp<pid>/``, write_store's ``.<store>.writing-*/``. Readers must never pick these."""
    return any(part.startswith(".") for part in path.parts)


def assert_outputs_intact(folder: Path) -> dict[str, int]:
    """Every finished output under ``folder`` loads: JSON parses (JSON lines: all but a torn
    last line), .npy/.npz load without pickle, .pt load (detect checkpoints through
    ``load_checkpoint``, bare state dicts with ``weights_only``). Temporary files are skipped.
    Returns counts per kind, so a test can see something was checked."""
    from detect.common.checkpoints import load_checkpoint

    counts = {"json": 0, "jsonl": 0, "npy": 0, "npz": 0, "pt": 0}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or is_temporary(rel):
            continue
        if path.suffix == ".json" or path.name == "done":
            json.loads(path.read_text())
            counts["json"] += 1
        elif path.suffix == ".jsonl":
            lines = path.read_bytes().split(b"\n")
            for line in lines[:-1]:  # the last piece is empty, or a line a kill cut short
                json.loads(line)
            counts["jsonl"] += 1
        elif path.suffix == ".npy":
            np.load(path, allow_pickle=False)
            counts["npy"] += 1
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                for key in z.files:
                    z[key]
            counts["npz"] += 1
        elif path.suffix == ".pt":
            if path.name == "net.pt":  # R-CNN's fine-tuned network: a bare state dict
                assert isinstance(torch.load(path, map_location="cpu", weights_only=True), dict)
            else:
                load_checkpoint(path)
            counts["pt"] += 1
    return counts


def store_bytes(store: Path) -> dict[str, bytes]:
    """The files of a proposal store that its format defines (config.yaml is not one)."""
    return {name: (store / name).read_bytes() for name in ("boxes.f32", "index.npy", "meta.json", "files.json")
            if (store / name).exists()}


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from detect.common.checkpoints import load_checkpoint

    return load_checkpoint(checkpoint)["model"]


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over all floating tensors, relative to the largest |a| of each tensor."""
    assert a.keys() == b.keys()
    worst = 0.0
    for key, value in a.items():
        if value.is_floating_point():
            scale = max(float(value.abs().max()), 1e-12)
            worst = max(worst, float((value - b[key]).abs().max()) / scale)
    return worst

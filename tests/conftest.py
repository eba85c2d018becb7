"""Shared test helpers (the one module tests import helpers from).

- Fixtures: ``synthetic_dir`` (the synthetic dataset), ``tiny_coco`` (a hand-made COCO dataset
  with non-contiguous category ids), ``one_thread``.
- Fake evaluated runs for the report tests: ``write_run``, ``write_tiny_coco``, ``FAST_TIMING``.
- Selective search: ``blocky_image`` (random colour blocks), ``segment`` (FH as the engine calls it).
- Distributed, fault and bad-input tests:
  - ``make_square_dataset``: seeded COCO datasets of equal-sized images (coloured rectangles and
    discs on noise) with a proposal store of jittered ground truth plus random boxes, written
    with ``write_store`` (no selective search: training tests stay fast). Equal sizes matter for
    the "same effective batch" check: a batch of two images is zero-padded to the larger one,
    which changes the conv features near the border; equal images need no padding.
  - ``frcn_config`` / ``rcnn_config``: tiny configs (efficientnet_lite0, 96 px images).
  - ``torchrun_cmd`` / ``run_ok``: the ``detect`` command under ``torch.distributed.run`` with 2
    gloo ranks, as a subprocess.
  - ``WarmJob`` / ``run_warm`` / ``kill_when`` / ``kill_group``: a ``detect`` job forked from a
    warm server process (cheap to start many times), killed with SIGKILL at a chosen moment.
  - ``assert_outputs_intact``: after a kill, every output a later run reads must load.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
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
import pytest
import torch
import yaml
from PIL import Image

from detect.common.checkpoints import load_checkpoint
from detect.data.synthetic import make_synthetic
from detect.proposals.ss import segmentation as seg
from detect.proposals.store import write_store


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """The synthetic dataset, 8 train and 4 val images, seed 0: a folder holding train.json,
    val.json (file names relative to the folder) and images/{train,val}/*.png.
    Category ids 1 disc, 3 box, 7 triangle, 9 ring (classes 1..4)."""
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_train=8, num_val=4, seed=0)
    return out


# The tiny_coco dataset. Category ids are non-contiguous and listed out of order: after loading,
# class 1 is "cat" (id 2) and class 2 is "dog" (id 5).
TINY_COCO = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 80, "height": 60},
        {"id": 2, "file_name": "b.png", "width": 64, "height": 48},
        {"id": 3, "file_name": "c.png", "width": 50, "height": 50},  # no annotations
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [50, 5, 20.5, 10], "area": 205, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [0, 0, 64, 48], "area": 3072, "iscrowd": 0},
    ],
    "categories": [{"id": 5, "name": "dog"}, {"id": 2, "name": "cat"}],
}


@pytest.fixture
def tiny_coco(tmp_path) -> tuple[Path, Path]:
    """A hand-made 3-image COCO dataset (see TINY_COCO above): returns (json_path, image_dir).

    The JSON is tmp_path/tiny.json and the PNGs are in tmp_path/images (not the JSON's folder,
    so loaders must be given image_dir). Each object is a flat-coloured rectangle on grey:
    image 1 (80x60) has a cat at xyxy [10, 20, 40, 60] and a dog at [50, 5, 70.5, 15]; image 2
    (64x48) is all dog, [0, 0, 64, 48]; image 3 (50x50) has nothing.
    """
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    colours = {2: (220, 40, 40), 5: (40, 40, 220)}
    for entry in TINY_COCO["images"]:
        pixels = np.full((entry["height"], entry["width"], 3), 128, np.uint8)
        for ann in TINY_COCO["annotations"]:
            if ann["image_id"] == entry["id"]:
                x, y, w, h = ann["bbox"]
                pixels[int(y):int(y + h), int(x):int(x + w)] = colours[ann["category_id"]]
        Image.fromarray(pixels).save(image_dir / entry["file_name"])
    json_path = tmp_path / "tiny.json"
    json_path.write_text(json.dumps(TINY_COCO))
    return json_path, image_dir


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for modules of small tensors: OpenMP's spin-waits cost a busy
    2-core runner far more than a second thread gains (use via ``pytestmark``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Fake evaluated runs for the report, viewer and browser tests
# ----------------------------------------------------------------------------------------------

RECALL = np.linspace(0, 1, 101).round(2).tolist()  # [101] COCO recall points
PROPOSAL_RECALL = {"top_k": [100, 300, 1000, 2000], "recall@0.5": [0.6, 0.8, 0.9, 0.95],
                   "recall@0.7": [0.3, 0.5, 0.6, 0.7], "AR": [0.35, 0.5, 0.6, 0.66],
                   "MABO": [0.7, 0.75, 0.8, 0.82]}


def write_tiny_coco(root: Path) -> Path:
    """The report tests' dataset: root/val.json and 3 images (id 1 has no ground truth), categories 3 "cat" and 7 "dog" (not contiguous)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    coco = {"images": [{"id": i, "file_name": f"im{i}.png", "width": 64, "height": 48} for i in (1, 2, 3)],
            "annotations": [{"id": 1, "image_id": 2, "category_id": 3, "bbox": [5, 6, 30, 20],
                             "area": 600, "iscrowd": 0},
                            {"id": 2, "image_id": 3, "category_id": 7, "bbox": [20, 10, 40, 30],
                             "area": 1200, "iscrowd": 0}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    (root / "val.json").write_text(json.dumps(coco))
    return root / "val.json"


def write_run(run_dir: Path, *, detector: str, ap: float, timing: dict, data_json: Path | None,
              detections: list | None = None, full: bool = True, config: dict | None = None,
              **metrics_keys) -> Path:
    """A fake evaluated run folder for ``detect compare``: metrics.json (every key the report
    reads when ``full``, then ``metrics_keys``) and, if given, detections.json and config.yaml."""
    metrics = {"detector": detector, "coco": {"AP": ap, "AP50": 0.801, "AP75": 0.55, "APs": -1.0,
                                              "APm": 0.4, "APl": 0.6, "AR1": 0.3, "AR10": 0.5,
                                              "AR100": 0.65}}
    if full:
        dog = [round(0.9 - 0.5 * r, 4) if r <= 0.8 else -1.0 for r in RECALL]  # -1: unreached recall
        metrics.update({
            "name": run_dir.name, "backbone": "efficientnet_lite0", "device": "cpu",
            "num_parameters": 3_412_345, "num_images": 3,
            "per_class_AP": {"cat": ap + 0.1, "dog": 0.324}, "per_class_AP50": {"cat": 0.9, "dog": -1.0},
            "voc07": {"mAP": ap + 0.2, "per_class_AP": {"cat": ap + 0.2, "dog": -1.0}},
            "voc": {"mAP": -1.0, "per_class_AP": {"cat": -1.0, "dog": -1.0}},
            "pr_curve_50": {"recall": RECALL, "precision": {"all": [round(1 - ap * r, 4) for r in RECALL],
                                                            "cat": [1.0] * 101, "dog": dog}},
            "ap_per_iou": {"iou": [round(0.5 + 0.05 * i, 2) for i in range(10)],
                           "AP": [round(0.8 - 0.07 * i, 3) for i in range(10)]},
            "timing_ms_per_image": timing, "images_per_second": 1000.0 / sum(timing.values()),
            "peak_memory_mb": 1234.5, "train_time_s": 95.0, "proposal_recall": PROPOSAL_RECALL})
    if data_json is not None:
        metrics["data"] = {"format": "coco", "path": str(data_json), "images": "", "split": ""}
    metrics.update(metrics_keys)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if detections is not None:
        (run_dir / "detections.json").write_text(json.dumps(detections))
    return run_dir


FAST_TIMING = {"proposals": 1900.0, "backbone": 10.0, "roi_head": 4.0, "postprocess": 1.0}  # 15 ms
RCNN_TIMING = {"proposals": 1900.0, "warp": 30.0, "features": 300.0, "svm": 5.0, "bbox_reg": 2.0,
               "postprocess": 1.0}  # 338 ms: 338 / 15 = 22.5x


# ----------------------------------------------------------------------------------------------
# Selective search
# ----------------------------------------------------------------------------------------------


def blocky_image(rng, height, width, block=4, noise=20):
    """Random colour blocks plus noise: uint8 [H, W, 3] with several segments."""
    coarse = rng.integers(0, 256, ((height + block - 1) // block, (width + block - 1) // block, 3))
    image = np.repeat(np.repeat(coarse, block, 0), block, 1)[:height, :width]
    image = image + rng.integers(-noise, noise + 1, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def segment(image, k, min_size=None, edges=None):
    """FH of a uint8 [H, W, C] image with min_size = k by default ([SS]), as the engine calls it."""
    order, weights = edges if edges is not None else seg.sorted_edges(image)
    return seg.segment_graph(order, weights, *image.shape[:2], float(k), int(k if min_size is None else min_size))


# ----------------------------------------------------------------------------------------------
# Distributed, fault and bad-input tests: data, configs, subprocesses
# ----------------------------------------------------------------------------------------------


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

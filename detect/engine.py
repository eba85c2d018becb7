"""Training loop, checkpoints and the ``detect train`` command.

One plain loop serves Fast R-CNN training and R-CNN fine-tuning (as torchvision's
``references/detection/engine.py``): the caller gives ``step_fn(model, iteration) -> losses``,
which builds the mini-batch of that iteration deterministically from (seed, iteration), so a
resumed run sees exactly the batches an uninterrupted run would have seen without any sampler
state. The loop does the rest: mixed precision on CUDA, the non-finite-loss guard, the learning
rate, JSON-lines logs, atomic checkpoints and exact resume.

Checkpoint files (``torch.save``, loaded only with ``weights_only=True``):
- training state ``<output>/checkpoints/iter_0001000.pt``: {format, model, optimizer, scaler,
  iteration, rng, lr_schedule, extra}; ``<output>/checkpoints/last`` names the newest.
- a detector ``model_final.pt``: {format, kind, config, class_names, category_ids, model,
  extra} — what ``detect.inference.load_detector`` reads.

Under ``torchrun`` the model is wrapped in DistributedDataParallel, only rank 0 writes logs and
checkpoints, and ``step_fn`` is expected to give each rank its own share of the batch.
"""

from __future__ import annotations

import datetime
import errno
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from detect.io import append_jsonl, atomic_path, write_text_atomic

TRAIN_FORMAT = "detect-train-checkpoint"
DETECTOR_FORMAT = "detect-detector"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Distributed helpers (thin wrappers over torch.distributed)
# ----------------------------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return dist_info()[0] == 0


def barrier(group=None) -> None:
    if dist_info()[1] > 1:
        torch.distributed.barrier(group=group)


def long_wait_group():
    """A gloo process group with a 7-day timeout (None outside torch.distributed); every rank
    must create it. Its ``barrier`` lets ranks idle while rank 0 alone works for longer than a
    collective's default timeout (NCCL: 10 minutes), which would otherwise abort the job."""
    if dist_info()[1] <= 1:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=7))


def init_distributed(device: torch.device) -> None:
    """Join the process group that ``torchrun`` describes in the environment (no-op otherwise).

    NCCL for CUDA, gloo for CPU. Each rank uses GPU ``LOCAL_RANK``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)


def resolve_device(name: str = "") -> torch.device:
    """'' -> cuda (this rank's GPU) if available else cpu; 'cuda'/'cpu' as given."""
    if not name:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine (use --device cpu)")
        if name == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# Learning rate, seeding
# ----------------------------------------------------------------------------------------------


def step_lr(base_lr: float, steps: list[int], gamma: float = 0.1, warmup_iters: int = 0,
            warmup_factor: float = 0.001) -> Callable[[int], float]:
    """Linear warm-up from ``base_lr * warmup_factor``, then x``gamma`` at each of ``steps``."""
    steps = sorted(steps)

    def lr_at(iteration: int) -> float:
        lr = base_lr * gamma ** sum(1 for s in steps if iteration >= s)
        if iteration < warmup_iters:
            alpha = iteration / warmup_iters
            lr *= warmup_factor * (1 - alpha) + alpha
        return lr

    return lr_at


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save`` to a temporary file, then rename: a kill never leaves half a checkpoint.

    A failed write (a full disk) raises ``OSError`` naming ``path``; the previous checkpoints
    are untouched.
    """
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch reports a failed write as "enforce fail ... unexpected pos"
            free_mb = shutil.disk_usage(tmp.parent).free / 2**20
            raise OSError(errno.EIO, f"could not write the checkpoint (disk full? {free_mb:.0f} MiB free; "
                                     f"torch: {str(e).strip().splitlines()[0]})", str(path)) from None


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (``weights_only=True``: no code runs on load).

    Raises ``ValueError`` naming the file when it is missing, not a torch file, a pickle that
    wants to run code, or not one of ours.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        if "Weights only load failed" in str(e):  # torch's own advice (load it unsafely) is not ours
            raise ValueError(f"{path}: not a loadable checkpoint: refused, it holds Python objects other than "
                             "tensors and plain containers, which could run code when loaded") from None
        with open(path, "rb") as f:
            head = f.read(2)
        if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # torch.save: a zip (or a pickle)
            raise ValueError(f"{path}: not a loadable checkpoint (not a file written by torch.save)") from None
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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train_loop(*, model: nn.Module, step_fn: Callable[[nn.Module, int], dict[str, Tensor]],
               optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], max_iter: int,
               output_dir: str | Path, checkpoint_period: int, log_period: int = 20,
               amp: bool = True, device: torch.device = torch.device("cpu"),
               checkpoint_extra: dict | None = None, resume: bool = False,
               eval_fn: Callable[[nn.Module, int], dict] | None = None, eval_period: int = 0,
               keep_checkpoints: int = 2, desc: str = "train") -> nn.Module:
    """Run ``step_fn`` from the last checkpoint (``resume``) or iteration 0 up to ``max_iter``.

    ``step_fn(model, iteration)`` returns a dict of scalar losses; their sum is minimised.
    ``optimizer``'s param groups may carry ``lr_scale`` (e.g. 2 for biases, as [FRCN]).
    Raises ``FloatingPointError`` on a non-finite loss, after which the last good checkpoint
    is still the newest one on disk.
    """
    from tqdm import tqdm

    output_dir = Path(output_dir)
    ckpt_dir = output_dir / "checkpoints"
    rank, world = dist_info()
    main = rank == 0
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".*.tmp"):  # a checkpoint write cut short by a kill (atomic_path's)
            stale.unlink(missing_ok=True)
    model.to(device)

    start_iter = 0
    scaler_state = None
    prev = last_checkpoint(output_dir)
    if prev is not None and not resume:
        raise ValueError(f"{output_dir}: holds checkpoints already ({prev.name}); pass --resume to "
                         "continue, or choose another --output-dir")
    if prev is not None:
        state = load_checkpoint(prev)
        if state.get("format") != TRAIN_FORMAT:
            raise ValueError(f"{prev}: not a training checkpoint")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler_state = state.get("scaler")
        start_iter = int(state["iteration"])
        _set_rng_state(state["rng"])
        if main:
            print(f"resuming from {prev} at iteration {start_iter}")

    use_amp = amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    if scaler_state:
        scaler.load_state_dict(scaler_state)

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model.train()

    def save(iteration: int) -> None:
        if not main:
            return
        name = f"iter_{iteration:07d}.pt"
        save_checkpoint(ckpt_dir / name, {
            "format": TRAIN_FORMAT, "version": FORMAT_VERSION, "model": _unwrap(train_model).state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
            "rng": _rng_state(), "lr_schedule": {"lr": lr_at(iteration)}, "extra": checkpoint_extra or {},
        })
        write_text_atomic(ckpt_dir / "last", name + "\n")
        old = sorted(ckpt_dir.glob("iter_*.pt"))[:-keep_checkpoints]
        for p in old:
            p.unlink(missing_ok=True)

    log_path = output_dir / "log.jsonl"
    bar = tqdm(total=max_iter, initial=start_iter, desc=desc, unit="it", disable=not main, dynamic_ncols=True)
    t_last, window_losses = time.perf_counter(), []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for iteration in range(start_iter, max_iter):
        lr = lr_at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            losses = step_fn(train_model, iteration)
        loss = sum(losses.values())
        if not torch.isfinite(loss.detach()).all():
            good = last_checkpoint(output_dir)
            raise FloatingPointError(
                f"non-finite loss at iteration {iteration} ({ {k: float(v.detach()) for k, v in losses.items()} }); "
                f"training stopped; last good checkpoint: {good or 'none yet'}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        window_losses.append({k: float(v.detach()) for k, v in losses.items()})
        done = iteration + 1
        bar.update(1)
        if done % log_period == 0 or done == max_iter:
            now = time.perf_counter()
            names = list(window_losses[0])
            means = torch.tensor([sum(w[k] for w in window_losses) / len(window_losses) for k in names],
                                 dtype=torch.float64)  # [L] this rank's mean losses over the window
            if world > 1:  # log the global batch's losses (the mean over ranks), not rank 0's share
                means = means.to(device)
                torch.distributed.all_reduce(means)
                means = means.cpu() / world
            if main:
                record = {"iteration": done, "lr": lr, **{k: float(v) for k, v in zip(names, means)}}
                record["loss"] = float(means.sum())
                record["time_per_iter_s"] = (now - t_last) / len(window_losses)
                if device.type == "cuda":
                    record["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                append_jsonl(log_path, record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}")
            t_last, window_losses = now, []
        if done % checkpoint_period == 0 or done == max_iter:
            save(done)
        if eval_fn is not None and eval_period > 0 and done % eval_period == 0 and done != max_iter:
            _unwrap(train_model).eval()
            metrics = eval_fn(_unwrap(train_model), done)
            _unwrap(train_model).train()
            if main:
                append_jsonl(log_path, {"iteration": done, "eval": metrics})
        if done % checkpoint_period == 0:
            barrier()
    bar.close()
    return _unwrap(train_model)


def load_train_split(cfg):
    """The training dataset of ``cfg`` and its proposal store, checked against each other."""
    from detect.data import load_dataset
    from detect.proposals import ProposalStore

    spec = cfg.data.train
    dataset = load_dataset(spec.format, spec.path, spec.images, spec.split)
    if not cfg.data.train_proposals:
        raise ValueError("data.train_proposals is empty: compute a proposal store with `detect propose`")
    store = ProposalStore(cfg.data.train_proposals)
    store.check_dataset(dataset)
    return dataset, store


# ----------------------------------------------------------------------------------------------
# `detect train`
# ----------------------------------------------------------------------------------------------


def cli_train(args) -> int:
    from detect.config import load_config, save_config

    cfg = load_config(args.config, args.overrides)
    output_dir = Path(args.output_dir)
    _check_same_detector(output_dir, cfg.detector)
    device = resolve_device(args.device)
    init_distributed(device)
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    t0 = time.perf_counter()
    if cfg.detector == "fast_rcnn":
        from detect import fast_rcnn

        checkpoint = fast_rcnn.train(cfg, output_dir, resume=args.resume, device=device)
    elif cfg.detector == "rcnn":
        from detect import rcnn

        checkpoint = rcnn.train(cfg, output_dir, resume=args.resume, device=device)
    else:  # validated by the config loader already
        raise ValueError(f"unknown detector {cfg.detector!r}")
    train_time = time.perf_counter() - t0
    if is_main_process():
        _record_train_time(output_dir, train_time)
        print(f"trained {cfg.detector}: {checkpoint}")
    from detect.inference import evaluate_after_training

    evaluate_after_training(cfg, checkpoint, output_dir, device=device)
    return 0


def _check_same_detector(output_dir: Path, detector: str) -> None:
    """Refuse to train one detector into another's run folder: the stage checks of each (R-CNN's
    stage folders, Fast R-CNN's checkpoints/) do not see the other's files, and its
    model_final.pt and metrics.json would be overwritten."""
    import yaml

    previous = output_dir / "config.yaml"
    if not previous.is_file():
        return
    try:
        found = yaml.safe_load(previous.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        found = None
    kind = found.get("detector") if isinstance(found, dict) else None
    if kind is not None and kind != detector:
        raise ValueError(f"{output_dir}: holds a {kind} run ({previous}); training {detector} there would "
                         f"overwrite its model_final.pt; choose another --output-dir")


def _record_train_time(output_dir: Path, seconds: float) -> None:
    """Add this session's training seconds to ``train_time.json`` (a resumed run adds up)."""
    from detect.io import read_json, write_json_atomic

    path = output_dir / "train_time.json"
    total = read_json(path)["seconds"] if path.is_file() else 0.0
    if math.isfinite(seconds):
        write_json_atomic(path, {"seconds": total + seconds})

"""Where the code runs: ranks, device, mixed precision, random state, peak memory. Thin
wrappers over torch.distributed and torch.cuda, written once here."""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import resource
import warnings
from typing import Any

import numpy as np
import torch


def _in_process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size): the process group's, else torchrun's environment variables, else (0, 1)."""
    if _in_process_group():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def local_world_size() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def barrier(group=None) -> None:
    if _in_process_group() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier(group=group)


def long_wait_group():
    """A gloo group with a 7-day timeout (None outside torch.distributed; every rank must create
    it): its ``barrier`` lets ranks idle while rank 0 alone works past NCCL's 10-minute timeout."""
    if not _in_process_group() or torch.distributed.get_world_size() <= 1:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=7))


def init_distributed(device: torch.device | None = None) -> bool:
    """Join torchrun's process group (NCCL for a CUDA ``device``, else gloo); True if > 1 rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.distributed.is_initialized():
        return True
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def resolve_device(name: str = "") -> torch.device:
    """'' -> cuda (this rank's GPU, LOCAL_RANK) if available, else cpu; 'cuda'/'cpu' as given."""
    if not name:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine (use --device cpu)")
        if name == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it (no loss scaling needed), else fp16."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True):
    """Autocast on CUDA when ``enabled``; a no-op context on the CPU or when disabled."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=autocast_dtype(device))
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy, torch (CPU) and this process's current CUDA device RNG states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states() -> list[dict]:
    """Every rank's ``rng_state()``, indexed by rank (a collective), for rank 0's checkpoints."""
    _, world = rank_and_world()
    if world <= 1 or not _in_process_group():
        return [rng_state()]
    states: list = [None] * world
    torch.distributed.all_gather_object(states, rng_state())
    return states


def rng_state_of_rank(saved: list[dict], rank: int, world: int) -> dict:
    """This rank's entry of ``gather_rng_states``' list (rank 0's, warned, from another world size)."""
    if len(saved) != world:
        warnings.warn(f"resuming with {world} processes from a checkpoint written by {len(saved)}: every rank "
                      "restores rank 0's random state (random streams differ from an uninterrupted run)")
        return saved[0]
    return saved[rank]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator stats, or on Linux the process's RSS high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated, or the peak resident memory since ``reset_peak_memory`` (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # whole-process peak

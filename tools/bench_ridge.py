"""Peak memory and time of fitting one class's R-CNN box regressor: in-memory vs streamed.

    python tools/bench_ridge.py --rows 20000 --dim 4096

Writes a synthetic float16 [rows, dim] memmap (as the feature cache's pool5.f16), then fits a
4-target ridge regression in a fresh child process per method and reports its peak RSS:

- ``primal``: ``box_regression.RidgeAccumulator``: the D x D float64 Gram matrix accumulated
  from 512-row chunks of the memmap, then factorised in place.
- ``dual``: ``box_regression.fit_ridge_dual``: x kept as float32, the N x N float64 system.

``train_box_regressors`` takes the primal or the dual, whichever ``dual_is_smaller`` says needs
less memory. It also prints each method's projected peak for VGG16's pool5 (D = 25088) by
formula.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from detect.training.box_regression import RidgeAccumulator, dual_is_smaller, fit_ridge_dual

MIB = 2 ** 20


def child(method: str, path: str, rows: int, dim: int) -> None:
    x = np.memmap(path, dtype="<f2", mode="r", shape=(rows, dim))
    y = np.random.default_rng(1).normal(size=(rows, 4)).astype(np.float32)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if method == "dual":
        w, b = fit_ridge_dual(np.asarray(x, np.float32), y, 1000.0)
    else:
        acc = RidgeAccumulator(dim, 4)
        for s in range(0, rows, 256):  # as train_box_regressors feeds it: an image's rows at a time
            acc.add(x[s:s + 256], y[s:s + 256])
        w, b = acc.solve(1000.0)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": method, "peak_rss_mib": round(peak / MIB, 1),
                      "peak_above_start_mib": round((peak - base) / MIB, 1), "seconds": round(seconds, 2),
                      "w_norm": float(np.linalg.norm(w))}))


def projected_mib(rows: int, dim: int) -> dict:
    """Dominant allocations by formula (bytes of the big arrays alive at once)."""
    x32 = rows * dim * 4
    primal = dim * dim * 8 + 512 * dim * 8  # Gram matrix + one float64 chunk
    dual = x32 + rows * rows * 8 + 2 * 512 * dim * 8  # float32 x, the N x N system, two chunks
    return {"primal_mib": round(primal / MIB), "dual_mib": round(dual / MIB),
            "chosen": "dual" if dual_is_smaller(rows, dim) else "primal"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--methods", default="primal,dual")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, path, rows, dim = args.child
        child(method, path, int(rows), int(dim))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pool5.f16"
        rng = np.random.default_rng(0)
        mm = np.memmap(path, dtype="<f2", mode="w+", shape=(args.rows, args.dim))
        for s in range(0, args.rows, 1024):  # post-ReLU-like: non-negative, sparse
            block = rng.normal(size=(min(1024, args.rows - s), args.dim)).astype(np.float32)
            mm[s:s + len(block)] = np.maximum(block, 0)
        mm.flush()
        del mm
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for method in args.methods.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", method, str(path), str(args.rows),
                                  str(args.dim)], env=env, check=True, capture_output=True, text=True).stdout
            print(out.strip())
    print(json.dumps({"rows": args.rows, "dim": args.dim, "formula": projected_mib(args.rows, args.dim)}))
    for rows in (2000, args.rows):
        print(json.dumps({"rows": rows, "dim": 25088, "formula": projected_mib(rows, 25088)}))


if __name__ == "__main__":
    main()

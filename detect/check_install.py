"""Fail loudly if the installed torch/torchvision/OpenCV cannot do what the toolkit needs, and
compile selective search's numba kernels into numba's cache (``detect.proposals.ss.warm_up``).
Run by ``make venv``: ``python -m detect.check_install``.
"""

from __future__ import annotations

import sys


def main() -> int:
    import torch
    import torchvision
    from torchvision.ops import nms, roi_pool

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2], keep
    feats = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = roi_pool(feats, [torch.tensor([[0.0, 0.0, 3.0, 3.0]])], output_size=(1, 1))
    assert pooled.item() == 15.0, pooled
    import cv2

    if not hasattr(cv2, "ximgproc"):
        print("cv2.ximgproc is missing: install opencv-contrib-python-headless, not opencv-python",
              file=sys.stderr)
        return 1
    from detect.proposals.ss import warm_up

    seconds = warm_up()
    print(f"ok: torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"opencv {cv2.__version__} with ximgproc, cuda={torch.cuda.is_available()}; "
          f"selective search kernels compiled and cached in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

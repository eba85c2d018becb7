"""detect: selective search, R-CNN and Fast R-CNN, with one evaluation path to compare them.

The public Python API, importable from the top as torchvision's is::

    from detect import (load_detector, read_image, selective_search, ProposalStore,
                        evaluate_detections, load_dataset)

Conventions used everywhere in the package:
- Boxes are float xyxy in pixels of the original image, converted once at the edges.
- Class index 0 is background; object classes are 1..K. ``Dataset.category_ids`` maps them
  back to the dataset's own category ids, in one place (``detect.evaluation.coco``).
- Shape shorthand in comments: N images, R proposals, G ground-truth boxes, K object classes.

The layout, with every import running down this order: common -> data -> proposals -> models
-> training | evaluation -> predict | report -> commands | demo -> cli. The names below are
imported on first use, so that a proposal worker does not import torch models.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC_API = {
    "load_detector": "detect.models.build",
    "read_image": "detect.data.images",
    "load_dataset": "detect.data.datasets",
    "selective_search": "detect.proposals.selective_search",
    "ProposalStore": "detect.proposals.store",
    "evaluate_detections": "detect.evaluation.coco",
    "Detections": "detect.models.detector",
    "Dataset": "detect.data.datasets",
}
__all__ = sorted(_PUBLIC_API)


def __getattr__(name: str):
    if name in _PUBLIC_API:
        return getattr(importlib.import_module(_PUBLIC_API[name]), name)
    raise AttributeError(f"module 'detect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

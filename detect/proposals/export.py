"""Write a proposal store as the precomputed-proposal pickles detectron2 and mmdetection read
(this package never loads a pickle).

- ``detectron2``: a dict ``{"ids": [image ids], "boxes": [float32 [R, 4] XYXY_ABS],
  "objectness_logits": [float32 [R]], "bbox_mode": 0}`` (``BoxMode.XYXY_ABS``), the format of
  ``detectron2.data.detection_utils.load_proposals_into_dataset`` (``DATASETS.PROPOSAL_FILES_*``).
  Logits are higher-is-better: minus the ranking value.
- ``mmdet``: a list, in store order, of float32 [R, 5] arrays (x1, y1, x2, y2, score), as
  mmdetection's ``proposal_file`` holds; score = 1 / (1 + ranking value), in (0, 1].
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from detect.common.fileio import write_bytes_atomic
from detect.proposals.store import ProposalStore

FORMATS = ("detectron2", "mmdet")


def export_proposals(store: ProposalStore, fmt: str, path: str | os.PathLike) -> int:
    """Write ``store`` as ``fmt`` (one of ``FORMATS``) to ``path``, atomically; returns the image count."""
    ids = store.image_ids
    boxes = [store.get(image_id) for image_id in ids]  # [R, 4] xyxy each
    values = [store.scores(image_id) for image_id in ids]  # [R] ranking values, ascending
    if fmt == "detectron2":
        data = {"ids": ids, "boxes": boxes, "objectness_logits": [-v for v in values], "bbox_mode": 0}
    else:
        data = [np.concatenate([b, (1.0 / (1.0 + v))[:, None]], axis=1).astype(np.float32)
                for b, v in zip(boxes, values)]
    write_bytes_atomic(path, pickle.dumps(data, protocol=4))
    return len(ids)

"""The proposal store: one documented on-disk format for precomputed proposals.

A store is a folder, written by ``detect propose``::

    STORE/boxes.f32   raw little-endian float32 [total_boxes, 4]: every image's boxes, xyxy
                      pixels of the image as the user sees it, image after image, each image's
                      boxes in selective search's ranking.
    STORE/scores.f32  raw little-endian float32 [total_boxes]: each box's ranking value
                      (ascending), same order.
    STORE/index.npy   int64 [num_images, 3] rows (image_id, first_box_row, num_boxes), in the
                      input order (np.save; read with allow_pickle=False, mmap_mode="r").
    STORE/meta.json   {"format": "detect-proposals", "version": 1, every field of
                      detect.common.config.ProposalConfig, "code_version", "opencv_version",
                      "numba_version", "num_images", "num_boxes", "dataset_fingerprint"
                      (``dataset_fingerprint``), "failures": [{"image_id", "file", "reason"}]
                      for the images that could not be read or proposed (0 boxes)}
    STORE/files.json  a JSON list of {"image_id", "file"} (one per line, in input order).
    STORE/config.yaml the resolved config of the `detect propose` run (not part of the format).

No pickle, no timestamps: the same inputs and settings give byte-identical files. Reading
loads only the index (``boxes.f32`` is memory-mapped), so a COCO-sized store opens in
milliseconds. Read one image without this package::

    index = np.load("STORE/index.npy")                       # [N, 3] int64
    boxes = np.memmap("STORE/boxes.f32", dtype="<f4", mode="r").reshape(-1, 4)
    image_id, first, count = index[i]
    boxes_i = np.array(boxes[first:first + count])           # [R, 4] xyxy float32
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from detect.common.config import check_proposal_settings
from detect.common.fileio import read_json, write_bytes_atomic

FORMAT = "detect-proposals"
VERSION = 1
BOXES_FILE = "boxes.f32"
SCORES_FILE = "scores.f32"
INDEX_FILE = "index.npy"
META_FILE = "meta.json"
FILES_FILE = "files.json"
BOX_DTYPE = np.dtype("<f4")  # little-endian float32, whatever the machine
EXPORT_FORMATS = ("detectron2", "mmdet")


def dataset_fingerprint(items: Iterable[tuple[int, str]]) -> str:
    """sha256 of ``[[image_id, file basename], ...]`` in order (a moved dataset keeps its fingerprint)."""
    pairs = [[int(image_id), os.path.basename(str(path))] for image_id, path in items]
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode("utf-8")).hexdigest()


def write_store(path: str | os.PathLike, *, image_ids: list[int],
                boxes_per_image: Iterable, meta: dict[str, Any], files: list[str] | None = None,
                scratch_dir: str | os.PathLike | None = None, with_scores: bool = False) -> Path:
    """Write a new store at ``path`` (built in a scratch folder under ``scratch_dir``, default
    beside it, then renamed into place) and return ``path``. ``boxes_per_image`` streams one
    xyxy array [R_i, 4] per id of ``image_ids``, or with ``with_scores`` pairs (boxes, ranking
    values [R_i]; else the positions). ``meta``: the module docstring's fields but the counts,
    format and version. ``files`` (one path per image) becomes files.json."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: a proposal store (or other file) is already there")
    if files is not None and len(files) != len(image_ids):
        raise ValueError(f"{path}: {len(files)} files for {len(image_ids)} images")
    scratch_parent = Path(scratch_dir) if scratch_dir is not None else path.parent
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.writing-", dir=scratch_parent))
    try:
        index = np.zeros((len(image_ids), 3), dtype=np.int64)  # [N, 3]
        num_boxes = num_written = 0
        with open(scratch / BOXES_FILE, "wb") as f, open(scratch / SCORES_FILE, "wb") as g:
            for i, item in enumerate(boxes_per_image):
                if i >= len(image_ids):
                    raise ValueError(f"{path}: more box arrays than the {len(image_ids)} image ids")
                boxes, scores = item if with_scores else (item, None)
                boxes = np.ascontiguousarray(boxes, dtype=BOX_DTYPE).reshape(-1, 4)  # [R, 4]
                scores = np.arange(len(boxes)) if scores is None else scores
                scores = np.ascontiguousarray(scores, dtype=BOX_DTYPE).reshape(-1)  # [R]
                if len(scores) != len(boxes):
                    raise ValueError(f"{path}: image {image_ids[i]}: {len(scores)} scores for {len(boxes)} boxes")
                f.write(boxes.tobytes())
                g.write(scores.tobytes())
                index[i] = (image_ids[i], num_boxes, len(boxes))
                num_boxes += len(boxes)
                num_written += 1
            for out in (f, g):  # both on disk before the rename publishes the store
                out.flush()
                os.fsync(out.fileno())
        if num_written != len(image_ids):
            raise ValueError(f"{path}: {num_written} box arrays for {len(image_ids)} image ids")
        np.save(scratch / INDEX_FILE, index, allow_pickle=False)  # the name ends in .npy: kept as is
        full_meta = {"format": FORMAT, "version": VERSION, **meta,
                     "num_images": len(image_ids), "num_boxes": num_boxes}
        full_meta["failures"] = full_meta.pop("failures", [])  # last: the list may be long
        (scratch / META_FILE).write_text(json.dumps(full_meta, indent=2) + "\n", encoding="utf-8")
        if files is not None:
            lines = ",\n".join(json.dumps({"image_id": int(i), "file": str(f)}) for i, f in zip(image_ids, files))
            (scratch / FILES_FILE).write_text(f"[\n{lines}\n]\n" if lines else "[]\n", encoding="utf-8")
        os.rename(scratch, path)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return path


class ProposalStore:
    """Read-only access to a store folder; opening checks meta.json and index.npy against the data."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: proposal store not found (make one with `detect propose`)")
        for name in (META_FILE, INDEX_FILE, BOXES_FILE, SCORES_FILE):
            if not (self.path / name).is_file():
                raise ValueError(f"{self.path / name}: missing; {self.path} is not a complete proposal store")
        self.meta: dict[str, Any] = self._read_meta()
        self._index = self._read_index()  # [N, 3] int64
        self._boxes = self._map(BOXES_FILE, (4,))  # [num_boxes, 4]
        self._scores = self._map(SCORES_FILE, ())  # [num_boxes]
        self._row_of: dict[int, int] | None = None  # image_id -> index row, built on first use

    def _map(self, name: str, row_shape: tuple[int, ...]) -> np.ndarray:
        """File ``name`` memory-mapped as float32 [num_boxes, *row_shape], its size checked."""
        path, num_boxes = self.path / name, int(self.meta["num_boxes"])
        expected = num_boxes * BOX_DTYPE.itemsize * int(np.prod(row_shape))
        size = path.stat().st_size
        if size != expected:
            raise ValueError(f"{path}: {size} bytes, expected {expected} for {num_boxes} boxes (truncated "
                             f"or wrong file); delete {self.path} and re-run `detect propose`")
        if num_boxes == 0:  # np.memmap cannot map an empty file
            return np.zeros((0, *row_shape), dtype=BOX_DTYPE)
        return np.memmap(path, dtype=BOX_DTYPE, mode="r", shape=(num_boxes, *row_shape))

    def _read_meta(self) -> dict[str, Any]:
        meta_path = self.path / META_FILE
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{meta_path}: 'format' is {found!r}, expected {FORMAT!r}: not a proposal store")
        if meta.get("version") != VERSION:
            raise ValueError(f"{meta_path}: store version {meta.get('version')!r}, this code reads "
                             f"version {VERSION}; re-run `detect propose` or update detect")
        for key in ("num_images", "num_boxes"):
            if not isinstance(meta.get(key), int) or meta[key] < 0:
                raise ValueError(f"{meta_path}: '{key}' must be a count, got {meta.get(key)!r}")
        return meta

    def _read_index(self) -> np.ndarray:
        index_path = self.path / INDEX_FILE
        try:
            index = np.load(index_path, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{index_path}: unreadable index ({e})") from None
        num_images, num_boxes = self.meta["num_images"], self.meta["num_boxes"]
        if index.dtype != np.int64 or index.shape != (num_images, 3):
            raise ValueError(f"{index_path}: expected int64 [{num_images}, 3] "
                             f"(meta.json num_images), got {index.dtype} {list(index.shape)}")
        index = np.asarray(index)  # [N, 3]; small (24 bytes per image), checked in full
        first, count = index[:, 1], index[:, 2]
        bad = np.flatnonzero((first < 0) | (count < 0) | (first + count > num_boxes))
        if len(bad):
            row = int(bad[0])
            raise ValueError(f"{index_path}: row {row} (image id {int(index[row, 0])}) points at boxes "
                             f"{int(first[row])}..{int(first[row] + count[row])}, outside the "
                             f"{num_boxes} boxes of {BOXES_FILE} ({len(bad)} bad rows)")
        ids, counts = np.unique(index[:, 0], return_counts=True)
        if len(ids) != len(index):
            raise ValueError(f"{index_path}: image ids listed twice: {ids[counts > 1][:5].tolist()}")
        return index

    def _rows(self, image_id: int) -> slice:
        """The rows of image ``image_id`` in boxes.f32 and scores.f32 (KeyError if none)."""
        if self._row_of is None:
            self._row_of = {image_id: row for row, image_id in enumerate(self._index[:, 0].tolist())}
        row = self._row_of.get(int(image_id))
        if row is None:
            raise KeyError(f"image id {image_id} is not in proposal store {self.path}")
        _, first, count = self._index[row]
        return slice(first, first + count)

    def get(self, image_id: int) -> np.ndarray:
        """Proposals of one image: float32 [R, 4] xyxy original pixels (a copy, R may be 0)."""
        return np.array(self._boxes[self._rows(image_id)], dtype=np.float32)  # [R, 4]

    def scores(self, image_id: int) -> np.ndarray:
        """Ranking values of one image's proposals, float32 [R] (lower = ranked earlier)."""
        return np.array(self._scores[self._rows(image_id)], dtype=np.float32)  # [R]

    def num_boxes(self, image_id: int) -> int:
        rows = self._rows(image_id)
        return int(rows.stop - rows.start)

    def __contains__(self, image_id: object) -> bool:
        try:
            self._rows(image_id)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def __len__(self) -> int:
        return len(self._index)

    @property
    def settings(self) -> dict[str, Any]:
        """The selective-search settings it was made with (``check_proposal_settings``' keys in meta.json)."""
        return {k: self.meta[k] for k in check_proposal_settings({}) if k in self.meta}

    @property
    def image_ids(self) -> list[int]:  # in input order
        return self._index[:, 0].tolist()

    def files(self) -> dict[int, str] | None:
        """image_id -> input path from files.json, or None for a store without one."""
        files_path = self.path / FILES_FILE
        if not files_path.is_file():
            return None
        entries = read_json(files_path)
        try:
            return {int(e["image_id"]): str(e["file"]) for e in entries}
        except (TypeError, ValueError, KeyError):
            raise ValueError(f"{files_path}: expected a list of {{\"image_id\", \"file\"}} objects") from None

    def check_dataset(self, dataset) -> ProposalStore:
        """This store, if it has every image of ``dataset`` (same basenames in files.json); else ValueError."""
        missing = [r.image_id for r in dataset.records if r.image_id not in self]
        if missing:
            raise ValueError(
                f"proposal store {self.path} lacks {len(missing)} of the {len(dataset)} images of "
                f"dataset {dataset.name!r} (image ids {missing[:5]}{' ...' if len(missing) > 5 else ''}); "
                f"make a store for this dataset with `detect propose`")
        files = self.files()
        wrong = [(r.image_id, os.path.basename(files[r.image_id]), os.path.basename(r.file_name))
                 for r in dataset.records if files is not None
                 and os.path.basename(files[r.image_id]) != os.path.basename(r.file_name)]
        if wrong:
            shown = "; ".join(f"id {i}: store {a!r}, dataset {b!r}" for i, a, b in wrong[:5])
            raise ValueError(f"proposal store {self.path} was made for other files than dataset "
                             f"{dataset.name!r} ({len(wrong)} images differ: {shown})")
        return self

    def __repr__(self) -> str:
        return (f"ProposalStore({str(self.path)!r}, images={len(self)}, boxes={self.meta['num_boxes']}, "
                f"mode={self.meta.get('mode')!r})")


def export_proposals(store: ProposalStore, fmt: str, path: str | os.PathLike) -> int:
    """Write ``store`` as the precomputed-proposal pickle ``fmt`` (``EXPORT_FORMATS``) reads, to
    ``path``, atomically; returns the image count. detectron2 (``load_proposals_into_dataset``):
    {"ids", "boxes": float32 [R, 4] XYXY_ABS, "objectness_logits": minus the ranking values [R],
    "bbox_mode": 0}; mmdet (``proposal_file``): a list of float32 [R, 5] (x1, y1, x2, y2, score =
    1 / (1 + ranking value), in (0, 1]), in store order. This package never loads a pickle."""
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

"""Datasets in one internal representation (conventions: ``detect``), and their loaders.

Loaders convert each format's boxes once, here: COCO ``[x, y, w, h]`` (``load_coco``), VOC
1-based inclusive corners (``load_voc``, one file: ``read_voc_xml``). Structural problems
(malformed files, missing fields, duplicate or dangling ids) raise ``ValueError`` naming the
file and the entry; bad boxes are skipped or clipped and counted in a ``LoadReport``
(``dataset.report``), summarised in one ``DatasetWarning``.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from detect.common.box_ops import xywh_to_xyxy
from detect.common.fileio import read_json
from detect.data.images import image_size

# Boxes sticking out of the image by at most this many pixels are clipped without being
# counted: annotation tools round, and COCO has many boxes 0.01 px past the border.
CLIP_TOLERANCE = 1.0


class DatasetWarning(UserWarning):
    """Entries of a dataset that were skipped or repaired while loading it."""


# What a loader counts as it skips or repairs an entry, and how the warning says it.
PROBLEMS = {
    "boxes_nonfinite": "boxes with NaN/inf skipped",
    "boxes_empty": "boxes of zero or negative size skipped",
    "boxes_outside": "boxes entirely outside the image skipped",
    "boxes_clipped": "boxes partly outside the image clipped",  # by more than CLIP_TOLERANCE
    "images_missing": "missing images skipped",  # the rest: check_images only
    "images_unreadable": "unreadable images skipped",  # empty, corrupt or not an image
    "images_wrong_size": "images whose size differs from the annotation skipped",
}


@dataclass
class LoadReport:
    """What a loader kept, and what it skipped or repaired (counts of ``PROBLEMS``, a few examples)."""

    source: str
    num_images: int = 0  # images kept
    num_boxes: int = 0  # boxes kept, difficult/crowd included
    num_difficult: int = 0  # kept boxes flagged gt_difficult (VOC difficult, COCO iscrowd)
    problems: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, problem: str, message: str) -> None:
        self.add_many(problem, [0], lambda _: message)

    def add_many(self, problem: str, indices: Sequence[int], message_of: Callable[[int], str]) -> None:
        """Count ``len(indices)`` of ``problem``; ``message_of(i)`` writes only the examples kept."""
        self.problems[problem] += len(indices)
        self.examples += [message_of(int(i)) for i in indices[:max(0, self.max_examples - len(self.examples))]]

    @property
    def num_problems(self) -> int:
        return sum(self.problems.values())

    def summary(self) -> str:
        parts = [f"{self.problems[name]} {text}" for name, text in PROBLEMS.items() if self.problems[name]]
        line = (f"{self.source}: {self.num_images} images, {self.num_boxes} boxes "
                f"({self.num_difficult} difficult/crowd)")
        if parts:
            line += "; " + ", ".join(parts) + "; e.g. " + " | ".join(self.examples)
        return line


@dataclass
class ImageRecord:
    image_id: int
    file_name: str  # absolute path to the image file
    width: int  # as the user sees the image (after EXIF rotation)
    height: int
    gt_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # [G, 4] xyxy
    gt_classes: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # [G] in 1..K
    # [G] VOC difficult or COCO iscrowd: evaluation ignores these (training: see training_gt)
    gt_difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    # [G] COCO iscrowd (a subset of gt_difficult): never trained on. Empty = none.
    gt_crowd: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    # [G] COCO's own object areas (NaN = unknown, use the box), for its small/medium/large split.
    gt_areas: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))


def gt_flags(values: np.ndarray, num_gt: int) -> np.ndarray:
    """Per-box flags (``gt_difficult``, ``gt_crowd``) as bool [G]; empty means none set."""
    values = np.asarray(values, bool).reshape(-1)
    return values if len(values) else np.zeros(num_gt, bool)


def training_gt(record: ImageRecord, use_difficult: bool) -> np.ndarray:
    """Mask [G] of the boxes training learns from: not crowd, nor difficult unless ``use_difficult``."""
    num_gt = len(np.asarray(record.gt_boxes).reshape(-1, 4))
    keep = ~gt_flags(record.gt_crowd, num_gt)
    if not use_difficult:
        keep &= ~gt_flags(record.gt_difficult, num_gt)
    return keep


@dataclass
class Dataset:
    name: str
    records: list[ImageRecord]
    class_names: list[str]  # [K] names of classes 1..K (background is not listed)
    category_ids: list[int]  # [K] dataset category id of class k at position k - 1
    report: LoadReport | None = None  # what the loader skipped or repaired

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)


def load_dataset(fmt: str, path: str | os.PathLike, images: str | os.PathLike = "",
                 split: str = "", *, check_images: bool = False, classes: Sequence[str] | None = None) -> Dataset:
    """Load a dataset as ``detect.common.config.DatasetConfig`` describes it. ``classes`` (e.g.
    the training set's): VOC objects are mapped to them by name; a COCO file must have exactly
    these categories' names."""
    if not str(path):
        raise ValueError(f"no dataset path given for the {fmt!r} dataset (--data or data.*.path)")
    if fmt == "coco":
        dataset = load_coco(path, images or None, check_images=check_images)
        if classes and list(classes) != dataset.class_names:
            raise ValueError(f"{path}: has classes {dataset.class_names}, expected {list(classes)} "
                             "(the training classes)")
        return dataset
    if fmt == "voc":
        return load_voc(path, split, check_images=check_images, classes=classes)
    raise ValueError(f"unknown dataset format {fmt!r}: expected 'coco' or 'voc'")


def load_coco(json_path: str | os.PathLike, image_dir: str | os.PathLike | None = None, *,
              check_images: bool = False) -> Dataset:
    """Load a COCO instances JSON (``file_name`` relative to ``image_dir``, default its folder):
    ascending category ids become classes 1..K, boxes are converted in float64 (bit for bit).
    ``check_images``: skip images missing, unreadable or of another size (else read when used)."""
    json_path = Path(json_path)
    src = str(json_path)
    data = read_json(json_path)
    if not isinstance(data, dict):
        raise ValueError(f"{src}: the top level must be an object with 'images', 'annotations' "
                         f"and 'categories', got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{src}: missing required key '{key}' (a COCO instances file has "
                             "'images', 'annotations' and 'categories'; an empty list is fine)")
        if not isinstance(data[key], list):
            raise ValueError(f"{src}: '{key}' must be a list, got {type(data[key]).__name__}")
    image_dir = (Path(image_dir) if image_dir else json_path.parent).absolute()
    report = LoadReport(source=src)

    names_by_id: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        where = f"categories[{i}]"
        cat_id = _field(cat, "id", int, src, where)
        name = _field(cat, "name", str, src, where)
        if cat_id in names_by_id:
            raise ValueError(f"{src}: duplicate category id {cat_id} ({where})")
        names_by_id[cat_id] = name
    category_ids = sorted(names_by_id)
    class_of_category = {cat_id: k + 1 for k, cat_id in enumerate(category_ids)}

    records: list[ImageRecord] = []
    row_of_image: dict[int, int] = {}  # image id -> its row in records (= its index in "images")
    for i, entry in enumerate(data["images"]):
        image_id = _field(entry, "id", int, src, f"images[{i}]")
        where = f"images[{i}] (id {image_id})"
        file_name = _field(entry, "file_name", str, src, where)
        width = _field(entry, "width", (int, float), src, where)
        height = _field(entry, "height", (int, float), src, where)
        if not (width > 0 and height > 0):
            raise ValueError(f"{src}: {where}: width and height must be positive, got {width}x{height}")
        if image_id in row_of_image:
            raise ValueError(f"{src}: duplicate image id {image_id} (images[{row_of_image[image_id]}] "
                             f"and images[{i}])")
        row_of_image[image_id] = i
        records.append(ImageRecord(image_id=image_id, file_name=str(image_dir / file_name),
                                   width=int(width), height=int(height)))

    # One lean pass over the annotations collects their columns; _explain_bad_annotation names what is wrong.
    ann_ids, rows, classes, crowd, bboxes, areas = [], [], [], [], [], []
    for i, ann in enumerate(data["annotations"]):
        try:
            ann_id, image_id, category_id, bbox = ann["id"], ann["image_id"], ann["category_id"], ann["bbox"]
            iscrowd = ann.get("iscrowd", 0)
            well_formed = (type(ann_id) is int and type(image_id) is int and image_id in row_of_image
                           and type(category_id) is int and category_id in class_of_category
                           and type(bbox) is list and len(bbox) == 4 and iscrowd in (0, 1))
        except (KeyError, TypeError, AttributeError):
            well_formed = False
        if not well_formed:
            _explain_bad_annotation(ann, i, src, row_of_image, class_of_category)
        ann_ids.append(ann_id)
        rows.append(row_of_image[image_id])
        classes.append(class_of_category[category_id])
        crowd.append(bool(iscrowd))
        bboxes.append(bbox)
        area = ann.get("area")  # COCO's own; not a number: unknown (NaN)
        areas.append(float(area) if isinstance(area, (int, float)) and not isinstance(area, bool) else np.nan)
    if len(set(ann_ids)) != len(ann_ids):
        duplicates = sorted(a for a, n in Counter(ann_ids).items() if n > 1)
        where = [i for i, a in enumerate(ann_ids) if a == duplicates[0]]
        raise ValueError(f"{src}: duplicate annotation id {duplicates[0]} (annotations[{where[0]}] and "
                         f"annotations[{where[1]}]); {len(duplicates)} duplicated ids in all")
    xyxy = xywh_to_xyxy(_number_array(bboxes, ann_ids, src))  # [A, 4] float64
    rows = np.asarray(rows, dtype=np.int64)  # [A]
    sizes = np.array([(r.width, r.height) for r in records], dtype=np.float64).reshape(-1, 2)[rows]  # [A, 2]
    boxes, keep = clean_boxes(xyxy, sizes[:, 0], sizes[:, 1], report, lambda j: (
        f"{src}: annotations[{j}] (id {ann_ids[j]}), image id {records[rows[j]].image_id}"))

    # Group the kept boxes by image, keeping the file's order within an image.
    kept = np.flatnonzero(keep)[np.argsort(rows[keep], kind="stable")]  # [A']
    starts = np.concatenate([[0], np.cumsum(np.bincount(rows[kept], minlength=len(records)))])
    boxes = boxes[kept].astype(np.float32)  # [A', 4]
    classes = np.asarray(classes, dtype=np.int64)[kept]  # [A']
    crowd = np.asarray(crowd, dtype=bool)[kept]  # [A']
    areas = np.asarray(areas, dtype=np.float32)[kept]  # [A']
    for row, record in enumerate(records):
        record.gt_boxes = boxes[starts[row]:starts[row + 1]]
        record.gt_classes = classes[starts[row]:starts[row + 1]]
        record.gt_difficult = crowd[starts[row]:starts[row + 1]]
        record.gt_crowd = record.gt_difficult
        record.gt_areas = areas[starts[row]:starts[row + 1]]
    return _finish_loading(Dataset(name=json_path.stem, records=records,
                                   class_names=[names_by_id[c] for c in category_ids],
                                   category_ids=category_ids, report=report), check_images)


def _field(entry: Any, key: str, types: type | tuple[type, ...], src: str, where: str) -> Any:
    """``entry[key]``, checked to be of ``types``; otherwise ValueError naming file and entry."""
    if not isinstance(entry, dict):
        raise ValueError(f"{src}: {where} must be an object, got {type(entry).__name__}")
    if key not in entry:
        raise ValueError(f"{src}: {where} is missing '{key}'")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise ValueError(f"{src}: {where}: '{key}' has the wrong type: {value!r}")
    return value


def _explain_bad_annotation(ann: Any, i: int, src: str, row_of_image: dict, class_of_category: dict) -> None:
    """Raise the ValueError that says what is wrong with annotation ``i``."""
    ann_id = _field(ann, "id", int, src, f"annotations[{i}]")
    where = f"annotations[{i}] (id {ann_id})"
    image_id = _field(ann, "image_id", int, src, where)
    category_id = _field(ann, "category_id", int, src, where)
    bbox = _field(ann, "bbox", list, src, where)
    if image_id not in row_of_image:
        raise ValueError(f"{src}: {where} refers to unknown image id {image_id}")
    if category_id not in class_of_category:
        raise ValueError(f"{src}: {where} has unknown category id {category_id} "
                         f"(known: {sorted(class_of_category)})")
    if len(bbox) != 4:
        raise ValueError(f"{src}: {where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1):
        raise ValueError(f"{src}: {where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
    raise ValueError(f"{src}: {where}: malformed annotation")


def _number_array(bboxes: list[list], ann_ids: list[int], src: str) -> np.ndarray:
    """The COCO bboxes as a float64 array [A, 4]; ValueError naming the first non-number."""
    try:
        array = np.array(bboxes) if bboxes else np.zeros((0, 4))
    except ValueError:  # a nested list inside a bbox
        array = np.zeros((0,), dtype=object)
    if array.dtype.kind in "iuf" and array.shape == (len(bboxes), 4):
        return array.astype(np.float64)
    for i, bbox in enumerate(bboxes):
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in bbox):
            raise ValueError(f"{src}: annotations[{i}] (id {ann_ids[i]}): 'bbox' must be 4 numbers "
                             f"[x, y, w, h], got {bbox!r}")
    raise ValueError(f"{src}: 'bbox' entries must be 4 numbers each")


def clean_boxes(boxes: np.ndarray, widths: np.ndarray, heights: np.ndarray, report: LoadReport,
                describe: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
    """Xyxy boxes [N, 4] float64 clipped to their images' ``widths`` and ``heights`` [N], and
    ``keep`` [N]: False for a NaN or inf, zero or negative size, or entirely outside. Each case
    (and clipping by over CLIP_TOLERANCE) is counted in ``report``, box j named ``describe(j)``."""
    with np.errstate(invalid="ignore"):
        x1, y1, x2, y2 = boxes.T  # [N] each
        finite = np.isfinite(boxes).all(axis=1)  # [N]
        empty = finite & ((x2 <= x1) | (y2 <= y1))
        outside = finite & ~empty & ((x2 <= 0) | (y2 <= 0) | (x1 >= widths) | (y1 >= heights))
        keep = finite & ~empty & ~outside
        clipped = np.stack([np.maximum(x1, 0), np.maximum(y1, 0), np.minimum(x2, widths),
                            np.minimum(y2, heights)], axis=1)  # [N, 4]
        moved = keep & (np.abs(clipped - boxes).max(axis=1) > CLIP_TOLERANCE)
    report.add_many("boxes_nonfinite", np.flatnonzero(~finite),
                    lambda j: f"{describe(j)}: non-finite box {boxes[j].tolist()}")
    report.add_many("boxes_empty", np.flatnonzero(empty),
                    lambda j: f"{describe(j)}: empty box, width {x2[j] - x1[j]:g}, height {y2[j] - y1[j]:g}")
    report.add_many("boxes_outside", np.flatnonzero(outside), lambda j: (
        f"{describe(j)}: box {boxes[j].tolist()} outside the {widths[j]:g}x{heights[j]:g} image"))
    report.add_many("boxes_clipped", np.flatnonzero(moved), lambda j: (
        f"{describe(j)}: box {boxes[j].tolist()} clipped to the {widths[j]:g}x{heights[j]:g} image"))
    return clipped, keep


def _finish_loading(dataset: Dataset, check_images: bool) -> Dataset:
    """Shared end of every loader: optional image checks, counts, the warning, the empty check."""
    report = dataset.report
    if check_images:
        dataset.records = _check_image_files(dataset.records, report)
    report.num_images = len(dataset.records)
    report.num_boxes = sum(len(r.gt_boxes) for r in dataset.records)
    report.num_difficult = sum(int(r.gt_difficult.sum()) for r in dataset.records)
    if report.num_problems:
        warnings.warn(report.summary(), DatasetWarning)
    if not dataset.records:
        skipped = sum(report.problems[name] for name in PROBLEMS if name.startswith("images_"))
        reason = f" left: all {skipped} were skipped ({report.summary()})" if skipped else ""
        raise ValueError(f"{report.source}: the dataset has no images{reason}")
    return dataset


def _check_image_files(records: list[ImageRecord], report: LoadReport) -> list[ImageRecord]:
    """The records whose file exists, has a readable header (PIL ``verify``) and the annotated size."""
    kept = []
    for record in tqdm(records, desc="checking images", unit="img", disable=None):
        path = Path(record.file_name)
        if not path.is_file():
            report.add("images_missing", f"{path}: image id {record.image_id}: file not found")
            continue
        try:
            with Image.open(path) as im:
                im.verify()  # must come first: it leaves the image unusable
            width, height = image_size(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            report.add("images_unreadable", f"{path}: image id {record.image_id}: cannot read ({e})")
            continue
        if (width, height) != (record.width, record.height):
            report.add("images_wrong_size", f"{path}: image id {record.image_id}: file is "
                       f"{width}x{height}, annotation says {record.width}x{record.height}")
            continue
        kept.append(record)
    return kept


def load_voc(root: str | os.PathLike, split: str, *, check_images: bool = False,
             classes: Sequence[str] | None = None) -> Dataset:
    """Load a VOC-style folder (PASCAL VOC, LabelImg, CVAT): ``Annotations/<name>.xml`` of each
    name in ``ImageSets/Main/<split>.txt``. Classes (category ids 1..K): ``classes``, else the 20
    ``VOC_CLASSES`` if every name found is one of them, else the names found, sorted. Image ids:
    the names as integers ("2008_000008" -> 2008000008) when all are distinct digits, else
    1-based positions."""
    root = Path(root)
    if not split:
        raise ValueError(f"{root}: a VOC dataset needs a split name (e.g. --split test)")
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: split file not found (a VOC folder has "
                                "Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt)")
    names = [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"{split_file}: duplicate image names {duplicates[:10]}")
    digits = [n.replace("_", "") for n in names]
    numeric = all(d.isdigit() for d in digits) and len({int(d) for d in digits}) == len(digits)
    image_ids = [int(d) for d in digits] if numeric else list(range(1, len(names) + 1))

    report = LoadReport(source=str(split_file))
    read = [read_voc_xml(root / "Annotations" / f"{name}.xml", root / "JPEGImages", name, image_id, report)
            for name, image_id in tqdm(zip(names, image_ids), total=len(names), desc="reading VOC annotations",
                                       unit="img", disable=None)]
    records = [record for record, _ in read]
    object_names = [kept_names for _, kept_names in read]  # [G'] of each record
    if classes:
        class_names = list(classes)
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"duplicate class names in {class_names}")
    else:
        found = {name for kept_names in object_names for name in kept_names}
        class_names = list(VOC_CLASSES) if found <= set(VOC_CLASSES) else sorted(found)
    class_of_name = {name: k + 1 for k, name in enumerate(class_names)}
    for record, kept_names, name in zip(records, object_names, names):
        unknown = [j for j, n in enumerate(kept_names) if n not in class_of_name]
        if unknown:
            raise ValueError(f"{root / 'Annotations' / name}.xml: object {record.gt_classes[unknown[0]]}: class "
                             f"{kept_names[unknown[0]]!r} is not one of the {len(class_names)} "
                             f"training classes {class_names}")
        record.gt_classes = np.array([class_of_name[n] for n in kept_names], np.int64)
    return _finish_loading(Dataset(name=f"{root.name}_{split}", records=records, class_names=class_names,
                                   category_ids=list(range(1, len(class_names) + 1)), report=report), check_images)


# The 20 PASCAL VOC classes in the standard order: class k is the same whatever the split holds.
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


def read_voc_xml(xml_path: Path, image_dir: Path, name: str, image_id: int,
                 report: LoadReport) -> tuple[ImageRecord, list[str]]:
    """Image ``image_id``'s record from ``xml_path`` (boxes cleaned into ``report``, ``gt_classes``
    the kept objects' indices until ``load_voc`` maps their names), and those names. The image is
    ``image_dir/<name>.jpg``, else ``image_dir/<filename>`` (LabelImg/CVAT). A missing ``<size>``
    is read from the image, a missing ``<difficult>`` is 0. VOC's 1-based inclusive corners
    become ``(xmin - 1, ymin - 1, xmax, ymax)``, continuous 0-based."""
    try:
        tree = ET.parse(xml_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{xml_path}: annotation file not found (its image is in the split "
                                "file)") from None
    except ET.ParseError as e:
        raise ValueError(f"{xml_path}: malformed XML ({e})") from None
    annotation = tree.getroot()
    image_path = image_dir / f"{name}.jpg"
    file_name = (annotation.findtext("filename") or "").strip()
    if not image_path.is_file() and file_name and (image_dir / file_name).is_file():
        image_path = image_dir / file_name
    if annotation.find("size/width") is None and annotation.find("size/height") is None:
        try:
            width, height = image_size(image_path)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{xml_path}: no <size>, and its image {image_path} cannot be read for it "
                             f"({e})") from None
    else:
        width = _voc_number(annotation, "size/width", xml_path, "<annotation>")
        height = _voc_number(annotation, "size/height", xml_path, "<annotation>")
    if not (width > 0 and height > 0):
        raise ValueError(f"{xml_path}: width and height must be positive, got {width:g}x{height:g}")
    boxes, names, difficult = [], [], []
    for j, obj in enumerate(annotation.findall("object")):
        where = f"object {j}"
        class_name = (obj.findtext("name") or "").strip()
        if not class_name:
            raise ValueError(f"{xml_path}: {where} has no <name>")
        xmin, ymin, xmax, ymax = (_voc_number(obj, f"bndbox/{k}", xml_path, where)
                                  for k in ("xmin", "ymin", "xmax", "ymax"))
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise ValueError(f"{xml_path}: {where}: <difficult> must be 0 or 1, got {flag!r}")
        boxes.append((xmin - 1, ymin - 1, xmax, ymax))  # 1-based inclusive -> 0-based continuous
        names.append(class_name)
        difficult.append(flag == "1")
    width, height = int(width), int(height)  # the record's size, which the boxes are checked against
    boxes, keep = clean_boxes(np.array(boxes, dtype=np.float64).reshape(-1, 4), np.full(len(boxes), float(width)),
                              np.full(len(boxes), float(height)), report, lambda j: f"{xml_path}: object {j}")
    record = ImageRecord(image_id=image_id, file_name=str(image_path.absolute()), width=width, height=height,
                         gt_boxes=boxes[keep].astype(np.float32), gt_classes=np.flatnonzero(keep),
                         gt_difficult=np.array(difficult, dtype=bool)[keep])
    return record, [n for n, k in zip(names, keep) if k]


def _voc_number(element: ET.Element, path: str, xml_path: Path, where: str) -> float:
    text = element.findtext(path)
    if text is None or not text.strip():
        raise ValueError(f"{xml_path}: {where} is missing <{path}>")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{xml_path}: {where}: <{path}> is not a number: {text.strip()!r}") from None


def read_class_names(path: str | Path) -> list[str]:
    """``--classes FILE``: one class name a line, in class order; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"--classes {path}: no such file") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"--classes {path}: no class names in the file (one per line)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--classes {path}: duplicate class names {duplicates}")
    return names

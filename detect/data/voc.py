"""Reading one VOC-style annotation file (PASCAL VOC, LabelImg, CVAT) into plain values.

``detect.data.datasets.load_voc`` turns these into a ``Dataset`` (box checks, class ids).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from detect.data.images import image_size

# The 20 PASCAL VOC classes in the standard order: class k is the same whatever the split holds.
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


@dataclass
class VocAnnotation:
    image_path: Path
    width: int
    height: int
    boxes: np.ndarray  # [G, 4] float64 xyxy, 0-based continuous, not yet checked against the image
    names: list[str]  # [G] class names as written
    difficult: np.ndarray  # [G] bool


def voc_class_names(found: set[str]) -> list[str]:
    """Classes 1..K of a split with object names ``found``: ``VOC_CLASSES`` if all are VOC's, else sorted."""
    return list(VOC_CLASSES) if found <= set(VOC_CLASSES) else sorted(found)


def read_voc_xml(xml_path: Path, image_dir: Path, name: str) -> VocAnnotation:
    """Parse ``xml_path``; its image is ``image_dir/<name>.jpg``, else ``image_dir/<filename>``
    (LabelImg/CVAT). A missing ``<size>`` is read from the image, a missing ``<difficult>`` is 0.
    VOC's 1-based inclusive corners become ``(xmin - 1, ymin - 1, xmax, ymax)``, continuous
    0-based. Errors name the file and the object."""
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
    return VocAnnotation(image_path=image_path, width=int(width), height=int(height),
                         boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4), names=names,
                         difficult=np.array(difficult, dtype=bool).reshape(-1))


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

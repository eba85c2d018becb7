"""Dataset loaders (COCO, VOC), validation of bad input, COCO export, and read_image."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.data.datasets import (VOC_CLASSES, DatasetWarning, load_coco, load_dataset, load_voc, read_class_names,
                                  training_gt)
from detect.data.images import ImageReadError, read_image
from detect.common.fileio import write_json_atomic
from detect.evaluation.coco import dataset_to_coco


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------


def test_load_coco_converts_boxes_and_maps_classes(tiny_coco):
    json_path, image_dir = tiny_coco
    with no_warnings():
        dataset = load_coco(json_path, image_dir)
    assert dataset.category_ids == [2, 5]  # ascending ids -> classes 1, 2
    assert dataset.class_names == ["cat", "dog"]
    assert [r.image_id for r in dataset.records] == [1, 2, 3]
    first, second, empty = dataset.records
    np.testing.assert_array_equal(first.gt_boxes, np.array([[10, 20, 40, 60], [50, 5, 70.5, 15]], np.float32))
    assert first.gt_boxes.dtype == np.float32
    assert first.gt_classes.tolist() == [1, 2]
    assert first.gt_difficult.tolist() == [False, False]
    np.testing.assert_array_equal(second.gt_boxes, [[0, 0, 64, 48]])
    assert empty.gt_boxes.shape == (0, 4) and empty.gt_classes.shape == (0,)  # kept, no boxes
    assert Path(first.file_name) == image_dir / "a.png"
    assert (first.width, first.height) == (80, 60)
    assert dataset.report.num_images == 3 and dataset.report.num_boxes == 3
    assert dataset.report.num_problems == 0


def test_load_coco_default_image_dir_is_the_json_folder(tiny_coco, monkeypatch):
    json_path, _ = tiny_coco
    dataset = load_coco(json_path)
    assert Path(dataset.records[0].file_name) == json_path.parent / "a.png"
    monkeypatch.chdir(json_path.parent)
    dataset = load_coco(json_path.name, "images")  # relative paths give absolute file names
    assert dataset.records[0].file_name == str(json_path.parent / "images" / "a.png")
    dataset = load_dataset("coco", str(json_path), "")  # the CLI's empty --images
    assert Path(dataset.records[0].file_name) == json_path.parent / "a.png"


def test_crowd_boxes_are_kept_and_flagged(tmp_path):
    data = _coco()
    data["annotations"][1]["iscrowd"] = 1
    dataset = load_coco(_write(tmp_path, data))
    record = dataset.records[0]
    assert record.gt_difficult.tolist() == [False, True]
    assert record.gt_crowd.tolist() == [False, True]  # never trained on, whatever train.use_difficult
    assert training_gt(record, True).tolist() == training_gt(record, False).tolist() == [True, False]
    np.testing.assert_array_equal(record.gt_boxes[1], [30, 5, 50, 25])
    assert dataset.report.num_difficult == 1


def test_export_round_trip_keeps_boxes_classes_and_ids(tmp_path, tiny_coco):
    json_path, image_dir = tiny_coco
    dataset = load_coco(json_path, image_dir)
    dataset.records[0].gt_difficult[1] = True
    exported = dataset_to_coco(dataset)
    assert [a["id"] for a in exported["annotations"]] == [1, 2, 3]
    assert [a["iscrowd"] for a in exported["annotations"]] == [0, 1, 0]
    assert exported["annotations"][1]["category_id"] == 5
    assert exported["annotations"][1]["bbox"] == [50.0, 5.0, 20.5, 10.0]
    assert exported["categories"] == [{"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}]

    out = tmp_path / "export" / "gt.json"
    write_json_atomic(out, exported)
    again = load_coco(out)  # absolute file names
    assert again.category_ids == dataset.category_ids and again.class_names == dataset.class_names
    for a, b in zip(dataset.records, again.records):
        assert Path(a.file_name).resolve() == Path(b.file_name).resolve()
        np.testing.assert_array_equal(a.gt_boxes, b.gt_boxes)
        np.testing.assert_array_equal(a.gt_classes, b.gt_classes)
        np.testing.assert_array_equal(a.gt_difficult, b.gt_difficult)


def test_difficult_boxes_are_ignored_by_cocoeval(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = _coco()
    data["annotations"][1]["iscrowd"] = 1  # the second box is difficult
    gt = dataset_to_coco(load_coco(_write(tmp_path, data)))

    def ap50(detections):
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = copy.deepcopy(gt)
            coco_gt.createIndex()
            coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return coco_eval.stats[1]

    hit = {"image_id": 1, "category_id": 3, "bbox": [10, 10, 10, 20], "score": 0.9}
    on_difficult = {"image_id": 1, "category_id": 3, "bbox": [30, 5, 20, 20], "score": 0.95}
    assert ap50([hit]) == pytest.approx(1.0)  # missing the difficult box costs nothing
    assert ap50([hit, on_difficult]) == pytest.approx(1.0)  # finding it is no false positive
    gt["annotations"][1]["iscrowd"] = 0
    assert ap50([hit]) < 0.9  # the same miss counts once the box is not difficult


def _coco() -> dict:
    """A valid two-image COCO dict, for the bad-input tests to break one entry at a time."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                   {"id": 2, "file_name": "b.png", "width": 32, "height": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 10, 20], "iscrowd": 0},
                        {"id": 7, "image_id": 1, "category_id": 3, "bbox": [30, 5, 20, 20], "iscrowd": 0}],
        "categories": [{"id": 3, "name": "thing"}],
    }


def _write(tmp_path: Path, data: dict | list | str, name: str = "bad.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


DELETE = object()


def _broken(section: str, index: int, key: str, value=DELETE) -> dict:
    """``_coco()`` with one field of ``data[section][index]`` changed (or deleted)."""
    data = _coco()
    if value is DELETE:
        del data[section][index][key]
    else:
        data[section][index][key] = value
    return data


BAD_COCO = {  # case: (the broken file's content, substrings the error must contain)
    "top level not an object": ([_coco()], ["top level"]),
    "no annotations key": ({"images": [], "categories": []}, ["'annotations'"]),
    "images not a list": ({**_coco(), "images": {}}, ["'images' must be a list"]),
    "annotation not an object": ({**_coco(), "annotations": [[1, 2]]}, ["annotations[0] must be an object"]),
    "no images": ({**_coco(), "images": [], "annotations": []}, ["no images"]),
    "duplicate category id": ({**_coco(), "categories": [{"id": 3, "name": "a"}, {"id": 3, "name": "b"}]},
                              ["duplicate category id 3", "categories[1]"]),
    "image without file_name": (_broken("images", 1, "file_name"), ["images[1] (id 2)", "file_name"]),
    "image id not an int": (_broken("images", 0, "id", "x"), ["images[0]", "'id'"]),
    "duplicate image id": (_broken("images", 1, "id", 1), ["duplicate image id 1", "images[1]"]),
    "zero width image": (_broken("images", 1, "width", 0), ["images[1] (id 2)", "positive"]),
    "negative height image": (_broken("images", 0, "height", -5), ["images[0] (id 1)", "positive"]),
    "annotation without bbox": (_broken("annotations", 1, "bbox"), ["annotations[1] (id 7)", "bbox"]),
    "annotation without image_id": (_broken("annotations", 0, "image_id"), ["annotations[0] (id 1)", "image_id"]),
    "bbox of 3 numbers": (_broken("annotations", 1, "bbox", [1, 2, 3]), ["annotations[1] (id 7)", "bbox"]),
    "bbox with a string": (_broken("annotations", 1, "bbox", [1, 2, "3", 4]), ["annotations[1] (id 7)", "bbox"]),
    "bbox with a null": (_broken("annotations", 0, "bbox", [1, 2, None, 4]), ["annotations[0] (id 1)", "bbox"]),
    "duplicate annotation id": (_broken("annotations", 0, "id", 7), ["duplicate annotation id 7"]),
    "unknown category": (_broken("annotations", 1, "category_id", 99), ["id 7", "unknown category id 99"]),
    "unknown image": (_broken("annotations", 1, "image_id", 42), ["id 7", "unknown image id 42"]),
    "iscrowd not 0 or 1": (_broken("annotations", 1, "iscrowd", "yes"), ["id 7", "'iscrowd' must be 0 or 1"]),
}


@pytest.mark.parametrize("case", list(BAD_COCO))
def test_bad_coco_names_the_file_and_the_entry(tmp_path, case):
    content, expected = BAD_COCO[case]
    path = _write(tmp_path, content)
    with pytest.raises(ValueError) as info:
        load_coco(path)
    for text in [str(path)] + expected:
        assert text in str(info.value), (case, str(info.value))


def test_malformed_json_names_line_and_column(tmp_path):
    path = _write(tmp_path, '{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line 2, column"):
        load_coco(path)


def test_bad_boxes_are_skipped_or_clipped_and_counted(tmp_path):
    data = _coco()  # image 1 is 64 x 48
    bad_boxes = {
        10: [float("nan"), 1, 5, 5],  # skipped: non-finite
        11: [1, 1, float("inf"), 5],  # skipped: non-finite
        12: [5, 5, 0, 10],  # skipped: zero width
        13: [5, 5, 10, -3],  # skipped: negative height
        14: [100, 100, 10, 10],  # skipped: entirely outside
        15: [-10, 5, 30, 10],  # clipped to [0, 5, 20, 15], counted
        16: [40, 40, 24.5, 8],  # sticks out 0.5 px: clipped, not counted
    }
    for ann_id, bbox in bad_boxes.items():
        data["annotations"].append({"id": ann_id, "image_id": 1, "category_id": 3, "bbox": bbox})
    path = _write(tmp_path, data)  # json.dumps writes NaN and Infinity, which json.loads reads
    with pytest.warns(DatasetWarning) as caught:
        dataset = load_coco(path)
    report = dataset.report
    assert +report.problems == {"boxes_nonfinite": 2, "boxes_empty": 2, "boxes_outside": 1, "boxes_clipped": 1}
    assert report.num_boxes == 4
    np.testing.assert_array_equal(dataset.records[0].gt_boxes,
                                  [[10, 10, 20, 30], [30, 5, 50, 25], [0, 5, 20, 15], [40, 40, 64, 48]])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message and "2 boxes with NaN/inf skipped" in message and "id 10" in message


def test_cli_prints_a_dataset_warning_as_one_line(tiny_coco, tmp_path, capsys):
    from detect.cli import main
    from detect.proposals.store import write_store

    json_path, image_dir = tiny_coco
    data = json.loads(json_path.read_text())
    data["annotations"].append({"id": 99, "image_id": 2, "category_id": 2, "bbox": [500, 500, 5, 5]})
    json_path.write_text(json.dumps(data))
    write_store(tmp_path / "store", image_ids=[1, 2, 3], boxes_per_image=[np.zeros((0, 4))] * 3, meta={})
    assert main(["recall", "--data", str(json_path), "--images", str(image_dir), "--proposals",
                 str(tmp_path / "store"), "--out", str(tmp_path / "recall.json")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "outside the image" in line]
    assert len(lines) == 1 and lines[0].startswith(f"detect recall: warning: {json_path}: 3 images"), err
    assert "DatasetWarning" not in err and "datasets.py" not in err


def test_check_images_skips_missing_corrupt_and_wrongly_sized(tiny_coco):
    json_path, image_dir = tiny_coco
    with no_warnings():
        assert len(load_coco(json_path, image_dir, check_images=True)) == 3
    (image_dir / "a.png").unlink()
    (image_dir / "b.png").write_bytes(b"")
    Image.new("RGB", (51, 50)).save(image_dir / "c.png")
    with pytest.warns(DatasetWarning, match="c.png"):
        with pytest.raises(ValueError, match="no images"):
            load_coco(json_path, image_dir, check_images=True)

    Image.new("RGB", (64, 48)).save(image_dir / "b.png")
    with pytest.warns(DatasetWarning) as caught:
        dataset = load_coco(json_path, image_dir, check_images=True)
    assert [r.image_id for r in dataset.records] == [2]
    report = dataset.report
    assert +report.problems == {"images_missing": 1, "images_wrong_size": 1}
    message = str(caught[0].message)
    assert "a.png" in message and "file not found" in message and "51x50" in message


def test_check_images_compares_the_exif_rotated_size(tmp_path):
    _exif_rotated_jpeg(tmp_path / "r.jpg")  # stored 40 wide, 20 high; seen 20 wide, 40 high
    data = {"images": [{"id": 1, "file_name": "r.jpg", "width": 20, "height": 40}],
            "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    with no_warnings():
        assert len(load_coco(_write(tmp_path, data, "ok.json"), check_images=True)) == 1
    data["images"][0].update(width=40, height=20)
    with pytest.warns(DatasetWarning, match="file is 20x40"):
        with pytest.raises(ValueError, match="no images"):
            load_coco(_write(tmp_path, data, "stored.json"), check_images=True)


# ----------------------------------------------------------------------------------------------
# VOC
# ----------------------------------------------------------------------------------------------


def _voc_xml(width: int, height: int, objects: list[tuple[str, tuple, int]]) -> str:
    parts = [f"<annotation><folder>VOC2007</folder><size><width>{width}</width><height>{height}</height>"
             "<depth>3</depth></size>"]
    for name, (xmin, ymin, xmax, ymax), difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                     f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


@pytest.fixture
def voc_root(tmp_path) -> Path:
    """VOC2007-style tree: 000005 (500x375: a chair, a difficult chair), 000007 (500x333: a car
    reaching the right border), split "trainval"."""
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    (root / "Annotations" / "000005.xml").write_text(_voc_xml(500, 375, [
        ("chair", (263, 211, 324, 339), 0), ("chair", (5, 10, 70, 90), 1)]))
    (root / "Annotations" / "000007.xml").write_text(_voc_xml(500, 333, [("car", (141, 50, 500, 330), 0)]))
    Image.new("RGB", (500, 375)).save(root / "JPEGImages" / "000005.jpg")
    Image.new("RGB", (500, 333)).save(root / "JPEGImages" / "000007.jpg")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n\n")
    return root


def test_load_voc_converts_one_based_corners_and_keeps_difficult(voc_root):
    with no_warnings():
        dataset = load_voc(voc_root, "trainval", check_images=True)
    assert dataset.class_names == list(VOC_CLASSES) and dataset.category_ids == list(range(1, 21))
    first, second = dataset.records
    assert (first.image_id, second.image_id) == (5, 7)
    assert Path(first.file_name) == voc_root / "JPEGImages" / "000005.jpg"
    assert (first.width, first.height) == (500, 375)
    np.testing.assert_array_equal(first.gt_boxes, [[262, 210, 324, 339], [4, 9, 70, 90]])
    chair = VOC_CLASSES.index("chair") + 1
    assert first.gt_classes.tolist() == [chair, chair]
    assert first.gt_difficult.tolist() == [False, True]
    np.testing.assert_array_equal(second.gt_boxes, [[140, 49, 500, 330]])  # xmax = width: inside
    assert second.gt_classes.tolist() == [VOC_CLASSES.index("car") + 1]
    assert dataset.report.num_problems == 0


def test_voc_export_to_coco_loads_back_the_same(voc_root, tmp_path):
    dataset = load_dataset("voc", str(voc_root), split="trainval")
    out = tmp_path / "voc_as_coco.json"
    write_json_atomic(out, dataset_to_coco(dataset))
    exported = json.loads(out.read_text())
    assert [a["iscrowd"] for a in exported["annotations"]] == [0, 1, 0]
    again = load_coco(out, check_images=True)
    assert again.category_ids == list(range(1, 21)) and again.class_names == list(VOC_CLASSES)
    for a, b in zip(dataset.records, again.records):
        assert a.image_id == b.image_id
        np.testing.assert_array_equal(a.gt_boxes, b.gt_boxes)
        np.testing.assert_array_equal(a.gt_classes, b.gt_classes)
        np.testing.assert_array_equal(a.gt_difficult, b.gt_difficult)


def test_voc_non_numeric_names_get_positional_ids(voc_root):
    for name in ("000005", "000007"):
        for sub, ext in (("Annotations", "xml"), ("JPEGImages", "jpg")):
            (voc_root / sub / f"{name}.{ext}").rename(voc_root / sub / f"img_{name}x.{ext}")
    (voc_root / "ImageSets" / "Main" / "trainval.txt").write_text("img_000005x\nimg_000007x\n")
    assert [r.image_id for r in load_voc(voc_root, "trainval").records] == [1, 2]


@pytest.mark.parametrize("case", ["malformed", "unknown class", "no xmin", "bad difficult", "zero size"])
def test_bad_voc_xml_names_the_file_and_the_object(voc_root, case):
    xml_path = voc_root / "Annotations" / "000007.xml"
    xml = _voc_xml(500, 333, [("car", (141, 50, 500, 330), 0), ("dog", (1, 2, 30, 40), 0)])
    text, expected = {
        "malformed": (xml.replace("</annotation>", ""), "malformed XML (no element found: line 1"),
        "unknown class": (xml.replace("dog", "unicorn"), "object 1: class 'unicorn' is not one of the 20"),
        "no xmin": (xml.replace("<xmin>1</xmin>", ""), "object 1 is missing <bndbox/xmin>"),
        "bad difficult": (xml.replace("<difficult>0</difficult><bndbox><xmin>1<", "<difficult>x</difficult><bndbox><xmin>1<"),
                          "object 1: <difficult> must be 0 or 1"),
        "zero size": (xml.replace("<width>500</width>", "<width>0</width>"), "width and height must be positive"),
    }[case]
    xml_path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_voc(voc_root, "trainval", classes=VOC_CLASSES)
    assert str(xml_path) in str(info.value) and expected in str(info.value), str(info.value)


def test_voc_bad_boxes_are_counted(voc_root):
    (voc_root / "Annotations" / "000007.xml").write_text(_voc_xml(500, 333, [
        ("car", ("nan", 50, 500, 330), 0), ("car", (10, 10, 9, 20), 0), ("car", (400, 300, 600, 340), 0)]))
    with pytest.warns(DatasetWarning, match="000007.xml: object 0"):
        dataset = load_voc(voc_root, "trainval")
    report = dataset.report
    assert +report.problems == {"boxes_nonfinite": 1, "boxes_empty": 1, "boxes_clipped": 1}
    np.testing.assert_array_equal(dataset.records[1].gt_boxes, [[399, 299, 500, 333]])


def test_voc_missing_files_and_bad_splits(voc_root):
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/test\.txt: split file not found"):
        load_voc(voc_root, "test")
    (voc_root / "ImageSets" / "Main" / "dup.txt").write_text("000005\n000007\n000005\n")
    with pytest.raises(ValueError, match=r"dup\.txt: duplicate image names \['000005'\]"):
        load_voc(voc_root, "dup")
    (voc_root / "ImageSets" / "Main" / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.txt: the dataset has no images"):
        load_voc(voc_root, "empty")
    (voc_root / "Annotations" / "000007.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"000007\.xml: annotation file not found"):
        load_voc(voc_root, "trainval")


def test_load_dataset_rejects_unknown_formats_and_missing_arguments(voc_root):
    with pytest.raises(ValueError, match="unknown dataset format 'yolo'"):
        load_dataset("yolo", "x.json")
    with pytest.raises(ValueError, match="needs a split"):
        load_dataset("voc", str(voc_root))
    with pytest.raises(ValueError, match="no dataset path"):
        load_dataset("coco", "")


# ----------------------------------------------------------------------------------------------
# read_image
# ----------------------------------------------------------------------------------------------


def _exif_rotated_jpeg(path: Path) -> None:
    """A JPEG stored 40 wide and 20 high, red in its left half, EXIF orientation 6 (the viewer
    turns it 90 degrees clockwise: 20 wide, 40 high, red in the top half)."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)


def test_read_image_converts_modes_to_rgb8(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.repeat(gray[:, :, None], 3, axis=2))

    rgba = np.zeros((3, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), np.broadcast_to([10, 20, 30], (3, 2, 3)))

    deep = np.array([[0, 65535], [32896, 1000]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.shape == (2, 2, 3)
    assert image[:, :, 0].tolist() == [[0, 255], [128, 4]]


def test_read_image_applies_exif_rotation(tmp_path):
    _exif_rotated_jpeg(tmp_path / "r.jpg")
    image = read_image(tmp_path / "r.jpg")
    assert image.shape == (40, 20, 3)
    assert image[:15, :, 0].min() > 200 and image[25:, :, 0].max() < 60  # red on top


@pytest.mark.parametrize("case", ["missing", "zero bytes", "text named .jpg", "truncated jpeg"])
def test_read_image_errors_name_the_file(tmp_path, case):
    path = tmp_path / "bad.jpg"
    if case == "zero bytes":
        path.write_bytes(b"")
    elif case == "text named .jpg":
        path.write_text("this is not an image\n")
    elif case == "truncated jpeg":
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, format="JPEG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value) and info.value.path == str(path)


def test_coco_segmentation_area_survives_for_size_buckets(tmp_path):
    """APs/APm/APl split by the dataset's own area, not the box's: it must round-trip."""
    import json

    from detect.data.datasets import load_coco
    from detect.evaluation.coco import dataset_to_coco

    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "x"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 900.5},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    out = dataset_to_coco(load_coco(path))
    assert [a["area"] for a in out["annotations"]] == [900.5, 400.0]


LABELIMG_XML = """<annotation><folder>JPEGImages</folder><filename>{file}</filename>
<source><database>Unknown</database></source>{size}
<object><name>{a}</name><pose>Unspecified</pose><truncated>1</truncated>
<bndbox><xmin>12.5</xmin><ymin>3.25</ymin><xmax>40.5</xmax><ymax>30</ymax></bndbox></object>
<object><name>{b}</name><bndbox><xmin>50</xmin><ymin>5</ymin><xmax>60</xmax><ymax>20</ymax></bndbox></object>
</annotation>"""


def _labelimg_root(tmp_path, objects=(("tree", "rock"), ("tree", "bush"))) -> Path:
    """A LabelImg/CVAT export: own class names, no <difficult>, fractional corners, a .png named
    by <filename>, and (image 2) no <size>."""
    root = tmp_path / "mine"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for i, (a, b) in enumerate(objects, start=1):
        Image.new("RGB", (64, 48)).save(root / "JPEGImages" / f"img{i}.png")
        size = "<size><width>64</width><height>48</height><depth>3</depth></size>" if i == 1 else ""
        (root / "Annotations" / f"img{i}.xml").write_text(LABELIMG_XML.format(file=f"img{i}.png", size=size, a=a, b=b))
    (root / "ImageSets" / "Main" / "train.txt").write_text("img1\nimg2\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("img2\n")
    return root


def test_voc_folder_with_its_own_class_names_from_labelimg(tmp_path):
    root = _labelimg_root(tmp_path)
    dataset = load_voc(root, "train")
    assert dataset.class_names == ["bush", "rock", "tree"] and dataset.category_ids == [1, 2, 3]
    first, second = dataset.records
    assert first.gt_classes.tolist() == [3, 2] and second.gt_classes.tolist() == [3, 1]
    np.testing.assert_allclose(first.gt_boxes[0], [11.5, 2.25, 40.5, 30])  # 1-based, fractional
    assert first.gt_difficult.tolist() == [False, False]  # no <difficult>: 0
    assert (second.width, second.height) == (64, 48)  # no <size>: from the image header
    assert second.file_name.endswith("img2.png")
    # the val split (no "rock") mapped by name to the training classes
    val = load_voc(root, "val", classes=dataset.class_names)
    assert val.class_names == dataset.class_names and val.records[0].gt_classes.tolist() == [3, 1]
    assert load_voc(root, "val").class_names == ["bush", "tree"]  # alone: its own names
    with pytest.raises(ValueError) as info:
        load_voc(root, "train", classes=["tree", "rock"])
    message = str(info.value)
    assert "img2.xml" in message and "object 1" in message and "'bush'" in message, message


def test_voc_names_keep_the_standard_order_and_a_classes_file_sets_another(tmp_path):
    root = _labelimg_root(tmp_path, objects=(("dog", "person"), ("cat", "dog")))
    assert load_voc(root, "train").class_names == list(VOC_CLASSES)  # ids 1..20 as PASCAL VOC
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("person\ncat\n\ndog\n")
    assert read_class_names(classes_file) == ["person", "cat", "dog"]
    dataset = load_dataset("voc", root, split="train", classes=read_class_names(classes_file))
    assert dataset.records[0].gt_classes.tolist() == [3, 1]
    classes_file.write_text("cat\ncat\n")
    with pytest.raises(ValueError, match="duplicate class names"):
        read_class_names(classes_file)

"""Bad input, one table: each row writes a bad file into tmp_path and runs the user-facing path.

A row is ``Case(name, setup, expect, messages, check)``:
- ``setup(tmp_path, shared)`` writes the bad input and returns the ``detect`` argv to run through
  ``detect.cli.main`` (the command line, in-process), or a callable for library entry points;
- ``expect``: "error" (exit status 2, one line on stderr; a callable must raise ValueError), "skip"
  (status 0, the bad entries skipped and counted in a warning or a report), or "ok" (handled:
  status 0, the check says how);
- ``messages``: substrings that must appear in stderr plus the warnings: the file or the key at
  fault ("{tmp}" is replaced by tmp_path), the count of what was skipped;
- ``check(tmp_path)``: optional assertions on the outputs.
An unexpected exception (a traceback) fails the row.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import frcn_config, make_square_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Case:
    name: str
    setup: Callable[[Path, dict], list[str] | Callable[[], object]]
    expect: str  # "error" | "skip" | "ok"
    messages: tuple[str, ...] = ()
    check: Callable[[Path], None] | None = None


# ----------------------------------------------------------------------------------------------
# Shared inputs: a small good dataset with a proposal store, an untrained detector checkpoint
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    from detect.common.config import from_dict, to_dict
    from detect.common.checkpoints import save_detector_checkpoint
    from detect.models.build import build_fast_rcnn

    root = tmp_path_factory.mktemp("bad_input_shared")
    train = make_square_dataset(root, num_images=4, name="train")
    val = make_square_dataset(root, num_images=2, name="val", seed=1)
    cfg_dict = frcn_config(train, None, max_iter=2, checkpoint_period=2)
    cfg = from_dict(cfg_dict)
    torch.manual_seed(0)
    model = build_fast_rcnn(cfg, ["box", "disc"])
    checkpoint = root / "fast_rcnn.pt"
    save_detector_checkpoint(checkpoint, kind="fast_rcnn", config=to_dict(cfg), class_names=["box", "disc"],
                             category_ids=[3, 7], state_dict=model.state_dict())
    good_image = root / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(good_image)
    return {"root": root, "train": train, "val": val, "config": cfg_dict, "checkpoint": checkpoint,
            "good_image": good_image}


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _coco(tmp: Path, **changes) -> dict:
    """A valid 2-image COCO dict (images exist in tmp/images), with top-level keys replaced."""
    (tmp / "images").mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 48), (90, 120, 150)).save(tmp / "images" / name)
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                       {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 20], "iscrowd": 0,
                             "area": 400},
                            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [10, 10, 30, 20], "iscrowd": 0,
                             "area": 600}],
            "categories": [{"id": 3, "name": "box"}, {"id": 7, "name": "disc"}]}
    coco.update(changes)
    return coco


def _annotations(*extra: dict) -> list[dict]:
    """One good annotation of image 1, then ``extra`` ones of image 2 (ids 10, 11, ...)."""
    good = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 20], "iscrowd": 0, "area": 400}
    return [good] + [{"id": 10 + i, "image_id": 2, "category_id": 7, "iscrowd": 0, **e} for i, e in enumerate(extra)]


def _eval_dataset(tmp: Path, coco: dict | str) -> list[str]:
    """Score an empty results file against the dataset ``coco``: loading is what is tested."""
    data = _write(tmp / "bad.json", coco)
    results = _write(tmp / "results.json", [])
    return ["eval", "--data", str(data), "--images", str(tmp / "images"), "--results", str(results),
            "--output-dir", str(tmp / "eval")]


# --- VOC ---


def _voc(tmp: Path, xml: str) -> list[str]:
    root = tmp / "VOC"
    (root / "JPEGImages").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(root / "JPEGImages" / "000001.jpg")
    _write(root / "Annotations" / "000001.xml", xml)
    _write(root / "ImageSets" / "Main" / "test.txt", "000001\n")
    results = _write(tmp / "results.json", [])
    return ["eval", "--format", "voc", "--data", str(root), "--split", "test", "--results", str(results),
            "--output-dir", str(tmp / "eval")]


def _voc_checkpoint(tmp: Path, shared: dict, name: str) -> list[str]:
    """`detect eval --checkpoint` (classes "box", "disc") on a VOC folder whose object is ``name``."""
    argv = _voc(tmp, _voc_xml(name=name))
    return argv[:argv.index("--results")] + ["--checkpoint", str(shared["checkpoint"]), "--device", "cpu",
                                             "--output-dir", str(tmp / "eval")]


VOC_OBJECT = "<object><name>{name}</name><difficult>0</difficult><bndbox>{box}</bndbox></object>"
VOC_BOX = "<xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>30</ymax>"


def _voc_xml(size: str = "<size><width>64</width><height>48</height><depth>3</depth></size>",
             name: str = "cat", box: str = VOC_BOX) -> str:
    return f"<annotation>{size}{VOC_OBJECT.format(name=name, box=box)}</annotation>"


# --- images, through `detect propose --input good.png BAD` ---


def _propose_images(tmp: Path, shared: dict, name: str, content: bytes | Callable[[Path], None],
                    resize: int = 0) -> list[str]:
    """``resize`` 0 (no resizing) keeps the tiny images cheap; the 20000 px one needs [RCNN]'s 500:
    selective search on the unresized 20000x8 strip takes minutes."""
    folder = tmp / "inputs"
    folder.mkdir()
    (folder / "good.png").write_bytes(shared["good_image"].read_bytes())
    if callable(content):
        content(folder / name)
    else:
        (folder / name).write_bytes(content)
    return ["propose", f"proposals.resize={resize}", "proposals.min_size=4", "--input", str(folder),
            "--out", str(tmp / "store"), "--workers", "1"]


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _failures(tmp: Path) -> list[dict]:
    return json.loads((tmp / "store" / "meta.json").read_text())["failures"]


def _store_counts(tmp: Path) -> dict[str, int]:
    from detect.proposals.store import ProposalStore

    store = ProposalStore(tmp / "store")
    files = store.files()
    return {Path(files[i]).name: store.num_boxes(i) for i in store.image_ids}


def _wide_png(path: Path) -> None:  # 20000 x 8 px, cheaply: a PNG of stripes compresses to ~1 kB
    pixels = np.zeros((8, 20000, 3), np.uint8)
    pixels[:, ::50] = (200, 30, 30)
    pixels[2:6, 5000:9000] = (30, 200, 30)
    Image.fromarray(pixels).save(path)


def _gray16_png(path: Path) -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    ramp[16:40, 16:40] = 60000
    Image.fromarray(ramp).save(path)  # PIL mode I;16


def _predict_odd_images(tmp: Path, shared: dict) -> list[str]:
    """good.png, a 1x1, a 20000x8 and a 16-bit image through `detect predict`: all get results."""
    _propose_images(tmp, shared, "dot.png", _png_bytes(np.zeros((1, 1, 3), np.uint8)))
    _wide_png(tmp / "inputs" / "wide.png")
    _gray16_png(tmp / "inputs" / "deep.png")
    return ["predict", "--checkpoint", str(shared["checkpoint"]), "--input", str(tmp / "inputs"),
            "--output-dir", str(tmp / "out"), "--device", "cpu", "--workers", "1"]


# --- configs and stores, through `detect train` ---


def _train(tmp: Path, shared: dict, config: dict | str, *overrides: str) -> list[str]:
    path = _write(tmp / "config.yaml", config if isinstance(config, str) else yaml.safe_dump(config))
    return ["train", "--config", str(path), "--output-dir", str(tmp / "run"), "--device", "cpu", *overrides]


def _with(config: dict, section: str, **values) -> dict:
    config = json.loads(json.dumps(config))
    config.setdefault(section, {}).update(values)
    return config


def _copy_store(shared: dict, tmp: Path, which: str = "train") -> Path:
    import shutil

    return Path(shutil.copytree(shared[which][2], tmp / "store"))


def _train_with_store(tmp: Path, shared: dict, store: Path) -> list[str]:
    return _train(tmp, shared, _with(shared["config"], "data", train_proposals=str(store)))


def _store_for_other_files(tmp: Path, shared: dict) -> list[str]:
    from detect.proposals.store import write_store

    store = write_store(tmp / "store", image_ids=[1, 2, 3, 4], boxes_per_image=[np.zeros((0, 4))] * 4, meta={},
                        files=[f"other_{i}.png" for i in range(4)])
    return _train_with_store(tmp, shared, store)


def _truncated_store(tmp: Path, shared: dict) -> list[str]:
    store = _copy_store(shared, tmp)
    data = (store / "boxes.f32").read_bytes()
    (store / "boxes.f32").write_bytes(data[: len(data) // 2 + 3])
    return _train_with_store(tmp, shared, store)


def _store_bad_meta(tmp: Path, shared: dict) -> list[str]:
    store = _copy_store(shared, tmp)
    (store / "meta.json").write_text('{"format": "detect-proposals", "version": 1, "num_')
    return _train_with_store(tmp, shared, store)


def _no_objects(tmp: Path, shared: dict) -> list[str]:
    """Every training image without an object: training runs (background only)."""
    coco = json.loads(Path(shared["train"][0]).read_text())
    data = _write(tmp / "empty_train.json", {**coco, "annotations": []})
    config = _with(shared["config"], "data", train={"format": "coco", "path": str(data),
                                                    "images": str(shared["train"][1])})
    return _train(tmp, shared, config)


def _unreadable_training_image(tmp: Path, shared: dict) -> list[str]:
    import shutil

    images = Path(shutil.copytree(shared["train"][1], tmp / "images"))
    (images / "train_2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    config = _with(shared["config"], "data", train={"format": "coco", "path": str(shared["train"][0]),
                                                    "images": str(images)})
    return _train(tmp, shared, config)


def _eval_with_unreadable_image(tmp: Path, shared: dict) -> list[str]:
    import shutil

    json_path, images, store = shared["val"]
    shutil.copytree(images, tmp / "images")
    (tmp / "images" / "val_1.png").write_bytes(b"not a png at all")
    return ["eval", "--checkpoint", str(shared["checkpoint"]), "--data", str(json_path), "--images",
            str(tmp / "images"), "--proposals", str(store), "--output-dir", str(tmp / "out"), "--device", "cpu"]


def _skipped_in_metrics(tmp: Path) -> None:
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    assert metrics["num_images"] == 2
    assert [(Path(e["file"]).name, e["reason"]) for e in metrics["skipped_images"]] == [
        ("val_1.png", "not an image (unrecognised format)")]


def _eval_on_a_json_checkpoint(tmp: Path, shared: dict) -> list[str]:
    json_path, images, store = shared["val"]
    return ["eval", "--checkpoint", str(_write(tmp / "metrics.json", {"coco": {}})), "--data", str(json_path),
            "--images", str(images), "--output-dir", str(tmp / "out"), "--device", "cpu"]


# --- checkpoints, through `detect predict` ---


def _predict(tmp: Path, shared: dict, checkpoint: Path) -> list[str]:
    return ["predict", "--checkpoint", str(checkpoint), "--input", str(shared["good_image"]),
            "--output-dir", str(tmp / "out"), "--device", "cpu", "--workers", "1"]


class _Evil:
    """A pickle payload: unpickling it calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_pickle(tmp: Path, shared: dict, as_torch: bool) -> list[str]:
    marker = tmp / "PWNED"
    path = tmp / "model_final.pt"
    if as_torch:
        torch.save({"format": "detect-detector", "kind": "fast_rcnn", "model": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"format": "detect-detector", "model": _Evil(marker)}))
    assert not marker.exists()
    return _predict(tmp, shared, path)


def _training_state(tmp: Path, shared: dict) -> list[str]:
    from detect.common.checkpoints import TRAIN_FORMAT, save_checkpoint

    save_checkpoint(tmp / "iter_0000002.pt", {"format": TRAIN_FORMAT, "model": {}, "iteration": 2})
    return _predict(tmp, shared, tmp / "iter_0000002.pt")


def _truncated_checkpoint(tmp: Path, shared: dict) -> list[str]:
    data = shared["checkpoint"].read_bytes()
    return _predict(tmp, shared, _write(tmp / "model_final.pt", data[: len(data) // 2]))


def _checkpoint_of_unknown_kind(tmp: Path, shared: dict) -> Callable[[], object]:
    from detect.common.checkpoints import load_checkpoint
    from detect.models.build import build_from_checkpoint

    ckpt = load_checkpoint(shared["checkpoint"])
    ckpt["kind"] = "yolo"
    return lambda: build_from_checkpoint(ckpt)


def _fast_rcnn_checkpoint_labelled_rcnn(tmp: Path, shared: dict) -> Callable[[], object]:
    from detect.common.checkpoints import load_checkpoint, save_checkpoint
    from detect.models.build import load_detector

    ckpt = load_checkpoint(shared["checkpoint"])
    ckpt["kind"] = "rcnn"
    save_checkpoint(tmp / "mislabelled.pt", ckpt)
    return lambda: load_detector(tmp / "mislabelled.pt", "cpu")


def _rcnn_into_fast_rcnn_run(tmp: Path, shared: dict) -> list[str]:
    run = tmp / "run"
    _write(run / "config.yaml", yaml.safe_dump(shared["config"]))  # detector: fast_rcnn
    _write(run / "run.json", json.dumps({"settings": {"detector": "fast_rcnn"}}))  # as `detect train` writes
    _write(run / "model_final.pt", shared["checkpoint"].read_bytes())
    from detect.common.config import FAST_RCNN_ONLY

    config = _with(shared["config"], "rcnn", ft_max_iter=1)
    config["detector"] = "rcnn"
    config["train"] = {k: v for k, v in config["train"].items() if k not in FAST_RCNN_ONLY["train"]}
    return _train(tmp, shared, config, "--resume")


def _model_final_untouched(tmp: Path) -> None:
    from detect.common.checkpoints import load_checkpoint

    assert load_checkpoint(tmp / "run" / "model_final.pt")["kind"] == "fast_rcnn"
    assert not (tmp / "run" / "finetune").exists()


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

CASES = [
    # COCO datasets (`detect eval --data`): structural errors name the file and the entry.
    Case("coco_malformed_json", lambda t, s: _eval_dataset(t, '{"images": ['), "error",
         ("bad.json", "malformed JSON", "line 1")),
    Case("coco_missing_annotations_key", lambda t, s: _eval_dataset(t, {"images": [], "categories": []}),
         "error", ("bad.json", "missing required key 'annotations'")),
    Case("coco_annotation_without_bbox", lambda t, s: _eval_dataset(t, _coco(t, annotations=[
        {"id": 1, "image_id": 1, "category_id": 3}])), "error", ("bad.json", "annotations[0] (id 1)", "'bbox'")),
    Case("coco_bbox_not_numbers", lambda t, s: _eval_dataset(t, _coco(t, annotations=_annotations(
        {"bbox": ["1", 2, 3, 4]}))), "error", ("bad.json", "annotations[1] (id 10)", "4 numbers")),
    Case("coco_unknown_category", lambda t, s: _eval_dataset(t, _coco(t, annotations=_annotations(
        {"bbox": [1, 1, 5, 5], "category_id": 42}))), "error", ("bad.json", "unknown category id 42")),
    Case("coco_annotation_of_unknown_image", lambda t, s: _eval_dataset(t, _coco(t, annotations=[
        {"id": 1, "image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5]}])), "error",
         ("bad.json", "unknown image id 99")),
    Case("coco_duplicate_image_ids", lambda t, s: _eval_dataset(t, _coco(t, images=[
        {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 1, "file_name": "b.png", "width": 64, "height": 48}])), "error", ("bad.json", "duplicate image id 1")),
    Case("coco_duplicate_annotation_ids", lambda t, s: _eval_dataset(t, _coco(t, annotations=_annotations(
        {"bbox": [1, 1, 5, 5], "id": 1}))), "error", ("bad.json", "duplicate annotation id 1")),
    Case("coco_image_without_size", lambda t, s: _eval_dataset(t, _coco(t, images=[
        {"id": 1, "file_name": "a.png", "width": 0, "height": 48}])), "error",
         ("bad.json", "images[0] (id 1)", "must be positive")),
    Case("coco_empty_dataset", lambda t, s: _eval_dataset(t, _coco(t, images=[], annotations=[])), "error",
         ("bad.json", "no images")),
    Case("coco_nan_box_skipped", lambda t, s: _eval_dataset(t, _coco(t, annotations=_annotations(
        {"bbox": [float("nan"), 2, 5, 5]}))), "skip",
         ("bad.json", "1 boxes with NaN/inf skipped", "annotations[1] (id 10)")),
    Case("coco_negative_and_zero_size_boxes_skipped", lambda t, s: _eval_dataset(t, _coco(t, annotations=_annotations(
        {"bbox": [3, 3, -5, 5]}, {"bbox": [3, 3, 0, 5]}))), "skip",
         ("bad.json", "2 boxes of zero or negative size skipped")),
    Case("coco_box_outside_image_skipped", lambda t, s: _eval_dataset(t, _coco(t, annotations=_annotations(
        {"bbox": [100, 100, 10, 10]}, {"bbox": [50, 40, 40, 40]}))), "skip",
         ("bad.json", "1 boxes entirely outside the image skipped", "1 boxes partly outside the image clipped")),
    # VOC
    Case("voc_malformed_xml", lambda t, s: _voc(t, "<annotation><size>"), "error",
         ("000001.xml", "malformed XML")),
    Case("voc_missing_size_read_from_the_image", lambda t, s: _voc(t, _voc_xml(size="")), "ok",
         ("metrics.json",)),
    Case("voc_missing_width", lambda t, s: _voc(t, _voc_xml(size="<size><height>48</height></size>")), "error",
         ("000001.xml", "missing <size/width>")),
    Case("voc_missing_box_corner", lambda t, s: _voc(t, _voc_xml(box="<xmin>5</xmin><ymin>5</ymin><xmax>9</xmax>")),
         "error", ("000001.xml", "object 0", "<bndbox/ymax>")),
    Case("voc_class_not_in_classes_file", lambda t, s: _voc(t, _voc_xml(name="unicorn")) + [
         "--classes", str(_write(t / "classes.txt", "cat\ndog\n"))], "error",
         ("000001.xml", "object 0", "'unicorn' is not one of the 2 training classes")),
    Case("voc_val_split_mapped_to_the_checkpoint_classes", lambda t, s: _voc_checkpoint(t, s, "disc"), "ok",
         ("metrics.json",), lambda t: json.loads((t / "eval" / "metrics.json").read_text())["data"]["classes"]
         == ["box", "disc"]),
    Case("voc_class_unknown_to_the_checkpoint", lambda t, s: _voc_checkpoint(t, s, "cat"), "error",
         ("000001.xml", "object 0", "'cat' is not one of the 2 training classes ['box', 'disc']")),
    Case("voc_missing_split_file", lambda t, s: ["eval", "--format", "voc", "--data", str(t), "--split", "test",
                                                 "--results", str(_write(t / "r.json", []))], "error",
         ("ImageSets/Main/test.txt", "split file not found")),
    # Images (`detect propose --input good.png BAD`): unreadable ones are skipped and listed.
    Case("image_corrupt", lambda t, s: _propose_images(t, s, "noise.png", os.urandom(300)), "skip",
         ("1 of 2 images failed", "noise.png", "not an image"),
         lambda t: _failures(t)[0]["file"].endswith("noise.png")),
    Case("image_truncated", lambda t, s: _propose_images(
        t, s, "cut.png", s["good_image"].read_bytes()[:400]), "skip",
         ("1 of 2 images failed", "cut.png", "truncated"), lambda t: len(_failures(t)) == 1),
    Case("image_zero_bytes", lambda t, s: _propose_images(t, s, "empty.jpg", b""), "skip",
         ("1 of 2 images failed", "empty.jpg", "empty file (0 bytes)")),
    Case("image_1x1", lambda t, s: _propose_images(t, s, "dot.png", _png_bytes(np.zeros((1, 1, 3), np.uint8))), "ok",
         ("2 images", "0 failed"), lambda t: _store_counts(t)["dot.png"] == 0),
    # At 500 px wide the strip is 1 px tall: no box reaches min_size in the resized image, where
    # [RCNN]'s FilterBoxesWidth measures it. Proposed without failing, with 0 boxes.
    Case("image_20000x8", lambda t, s: _propose_images(t, s, "wide.png", _wide_png, resize=500), "ok", ("0 failed",),
         lambda t: _store_counts(t)["wide.png"] == 0),
    Case("image_16_bit", lambda t, s: _propose_images(t, s, "deep.png", _gray16_png), "ok", ("0 failed",),
         lambda t: _store_counts(t)["deep.png"] > 0),
    Case("predict_on_odd_images", _predict_odd_images, "ok", ("4 image(s)", "0 error(s)"),
         lambda t: json.loads((t / "out" / "errors.json").read_text()) == []),
    Case("predict_missing_input", lambda t, s: ["predict", "--checkpoint", str(s["checkpoint"]), "--input",
                                                str(t / "nowhere.jpg"), "--output-dir", str(t / "out")],
         "error", ("nowhere.jpg", "no such file or folder")),
    # Proposal stores (`detect train`)
    Case("store_of_another_dataset", lambda t, s: _train_with_store(t, s, s["val"][2]), "error",
         ("proposals_val", "lacks 2 of the 4 images")),
    Case("store_for_other_files", _store_for_other_files, "error",
         ("store", "made for other files", "other_0.png")),
    Case("store_truncated", _truncated_store, "error", ("boxes.f32", "truncated")),
    Case("store_meta_malformed", _store_bad_meta, "error", ("meta.json", "malformed JSON")),
    Case("store_missing", lambda t, s: _train_with_store(t, s, t / "no_store"), "error",
         ("no_store", "proposal store not found")),
    # Training data without a single object, or with an unreadable image: training runs.
    Case("train_images_all_without_objects", _no_objects, "ok", ("trained fast_rcnn",),
         lambda t: (t / "run" / "model_final.pt").is_file()),
    Case("train_image_unreadable", _unreadable_training_image, "skip",
         ("train_2.png", "skipped 1 unreadable training images"), lambda t: (t / "run" / "model_final.pt").is_file()),
    # Configs (`detect train --config`)
    Case("config_unknown_key", lambda t, s: _train(t, s, _with(s["config"], "train", lrr=0.1)), "error",
         ("config.yaml", "unknown key 'train.lrr'")),
    Case("config_wrong_type", lambda t, s: _train(t, s, _with(s["config"], "train", max_iter="many")), "error",
         ("config.yaml", "'train.max_iter' must be an integer")),
    Case("config_out_of_range", lambda t, s: _train(t, s, _with(s["config"], "model", dropout=1.5)), "error",
         ("config.yaml", "'model.dropout' must be in [0, 1)")),
    Case("config_malformed_yaml", lambda t, s: _train(t, s, "train: [1, 2\nmodel: {"), "error",
         ("config.yaml", "malformed YAML")),
    Case("config_bad_override", lambda t, s: _train(t, s, s["config"], "train.lr"), "error",
         ("override 'train.lr'", "key=value")),
    Case("config_override_wrong_type", lambda t, s: _train(t, s, s["config"], "train.flip=maybe"), "error",
         ("'train.flip' must be true or false",)),
    # Checkpoints (`detect predict --checkpoint`, the builders, `detect train` into a run folder)
    Case("checkpoint_not_a_checkpoint", lambda t, s: _predict(t, s, _write(t / "notes.pt", "just text\n")),
         "error", ("notes.pt", "not a checkpoint (not a file written by torch.save")),
    Case("checkpoint_truncated", _truncated_checkpoint, "error",
         ("model_final.pt", "not a loadable checkpoint (corrupt or truncated")),
    Case("checkpoint_training_state", _training_state, "error",
         ("iter_0000002.pt", "training-state checkpoint, not a trained detector")),
    Case("checkpoint_crafted_pickle", lambda t, s: _crafted_pickle(t, s, as_torch=False), "error",
         ("model_final.pt", "not a loadable checkpoint"), lambda t: not (t / "PWNED").exists()),
    Case("checkpoint_crafted_torch_save", lambda t, s: _crafted_pickle(t, s, as_torch=True), "error",
         ("model_final.pt", "could run code"), lambda t: not (t / "PWNED").exists()),
    Case("checkpoint_of_an_unknown_kind", _checkpoint_of_unknown_kind, "error",
         ("unknown detector kind 'yolo'",)),
    Case("checkpoint_fast_rcnn_labelled_rcnn", _fast_rcnn_checkpoint_labelled_rcnn, "error",
         ("mislabelled.pt: does not match a rcnn model",)),
    Case("train_rcnn_into_a_fast_rcnn_run", _rcnn_into_fast_rcnn_run, "error",
         ("detector: before 'fast_rcnn', now 'rcnn'", "choose another --output-dir"), _model_final_untouched),
    Case("eval_checkpoint_is_a_json_file", _eval_on_a_json_checkpoint, "error",
         ("metrics.json", "not a checkpoint")),
    # Evaluation (`detect eval --checkpoint`): an unreadable image gets no detections, is named
    # in a warning and listed in metrics.json; the rest are scored.
    Case("eval_image_unreadable", _eval_with_unreadable_image, "skip",
         ("val_1.png", "no detections for an unreadable image", "skipped 1 unreadable image(s)"),
         _skipped_in_metrics),
    # Flags
    Case("propose_bad_shard", lambda t, s: ["propose", "--data", str(s["train"][0]), "--out", str(t / "store"),
                                            "--shard", "2/2"], "error", ("--shard '2/2'", "0 <= i < N")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, shared, tmp_path, capsys):
    from detect.cli import main

    target = case.setup(tmp_path, shared)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if callable(target):
            try:
                target()
                code, err = 0, ""
            except ValueError as e:
                code, err = 2, str(e)
        else:
            code = main([str(a) for a in target])
            captured = capsys.readouterr()
            err = captured.out + captured.err
    text = err + "\n" + "\n".join(str(w.message) for w in caught)
    assert code == (2 if case.expect == "error" else 0), text[-3000:]
    if case.expect == "error":
        assert "Traceback" not in text
    for message in case.messages:
        assert message.format(tmp=tmp_path) in text, f"{message!r} not in:\n{text[-3000:]}"
    if case.check is not None:
        assert case.check(tmp_path) is not False

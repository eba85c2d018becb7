"""detect predict: inputs, bad files, resume, path safety, ranks, output consistency.

A fake detector (deterministic scores, counts its calls) and a cheap proposal function keep the
tests fast; one test runs the real selective search when detect.proposals is there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detect.models.detector import Detector, ProposalScores
from detect.data.images import find_images
from detect.predict.batch import predict
from detect.predict.outputs import safe_relative_name
from detect.proposals.selective_search import selective_search
from detect.proposals.store import write_store

CLASS_NAMES = ["cat", "dog"]


class FakeDetector(Detector):
    """Proposal 0 -> cat 0.9, proposal 1 -> dog 0.7, proposal 2 -> cat 0.3 (below 0.5)."""

    kind = "fake"

    def __init__(self, **detector_kwargs):
        super().__init__(class_names=CLASS_NAMES, **detector_kwargs)
        self.calls = 0

    def score_proposals(self, image, proposal_boxes, timer=None):
        self.calls += 1
        num = proposal_boxes.shape[0]
        scores = torch.zeros(num, 2)  # [R, K]
        scores[0, 0] = 0.9
        if num > 1:
            scores[1, 1] = 0.7
        if num > 2:
            scores[2, 0] = 0.3
        return ProposalScores(proposal_boxes, scores, torch.zeros(num, 2, 4))


def quadrant_proposals(image, *, extra=0):
    """Top-left quarter, bottom-right quarter, whole image: [3, 4] xyxy."""
    h, w = image.shape[:2]
    return np.array([[0, 0, w / 2, h / 2], [w / 2, h / 2, w, h], [0, 0, w, h]], np.float32)


def run(inputs, out, detector=None, **kw):
    kw.setdefault("workers", 2)
    kw.setdefault("propose_fn", quadrant_proposals)
    kw.setdefault("progress", False)
    kw.setdefault("proposal_settings", {})
    detector = detector or FakeDetector()
    summary = predict(detector, [str(i) for i in inputs], out, score_threshold=0.5, **kw)
    return detector, summary


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def mixed_dir(tmp_path):
    """Good images of every awkward kind plus bad files. Returns (folder, {name: (w, h)})."""
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(rgb(64, 96)).save(d / "rgb.jpg")
    Image.fromarray(rgb(72, 80, 1)).save(d / "sub" / "nested.PNG")
    Image.fromarray(rgb(64, 64, 2)[:, :, 0]).save(d / "gray.png")
    Image.fromarray(rgb(48, 64, 3)[:, :, 0]).convert("RGBA").save(d / "rgba.png")
    deep = (np.arange(56 * 70, dtype=np.uint32).reshape(56, 70) * 16).astype(np.uint16)
    Image.fromarray(deep).save(d / "deep16.png")
    assert Image.open(d / "deep16.png").mode.startswith("I")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 100 x 60, seen 60 x 100
    Image.fromarray(rgb(60, 100, 4)).save(d / "exif.jpg", exif=exif)
    Image.fromarray(rgb(64, 64, 5)).save(d / "good.bmp")
    jpeg = (d / "rgb.jpg").read_bytes()
    (d / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("not an image\n")
    (d / "readme.txt").write_text("not an image extension: listed as unsupported\n")
    good = {"rgb.jpg": (96, 64), "sub/nested.PNG": (80, 72), "gray.png": (64, 64),
            "rgba.png": (64, 48), "deep16.png": (70, 56), "exif.jpg": (60, 100),
            "good.bmp": (64, 64)}
    return d, good


def load_outputs(out):
    out = Path(out)
    lines = [json.loads(x) for x in (out / "detections.jsonl").read_text().splitlines()]
    return {
        "coco": json.loads((out / "detections.json").read_text()),
        "images": json.loads((out / "images.json").read_text()),
        "categories": json.loads((out / "categories.json").read_text()),
        "errors": json.loads((out / "errors.json").read_text()),
        "lines": lines,
        "summary": json.loads((out / "summary.json").read_text()),
    }


def test_mixed_folder_good_images_get_results_bad_ones_errors(mixed_dir, tmp_path):
    d, good = mixed_dir
    detector, summary = run([d], tmp_path / "out", FakeDetector(category_ids=[3, 17]), visualize=True)
    o = load_outputs(tmp_path / "out")

    by_file = {Path(line["file"]).relative_to(d).as_posix(): line for line in o["lines"]}
    assert set(by_file) == set(good)
    for name, (w, h) in good.items():
        line = by_file[name]
        assert (line["width"], line["height"]) == (w, h), name
        # Fixed proposals: cat on the top-left quarter, dog on the bottom-right; 0.3 dropped.
        assert [(x["label"], x["box"], x["score"]) for x in line["detections"]] == [
            ("cat", [0, 0, w / 2, h / 2], 0.9), ("dog", [w / 2, h / 2, w, h], 0.7)]
        assert (tmp_path / "out" / "vis" / safe_relative_name(d / name, d)).is_file()

    errors = {Path(e["file"]).name: e["reason"] for e in o["errors"]}
    assert set(errors) == {"corrupt.jpg", "empty.jpg", "notes.jpg", "readme.txt"}
    assert "empty" in errors["empty.jpg"] and "not an image" in errors["notes.jpg"]
    assert "corrupt" in errors["corrupt.jpg"] and errors["readme.txt"] == "unsupported file type"
    assert detector.calls == len(good)
    assert summary.num_images == 7 and summary.num_errors == 4 and summary.num_inputs == 10
    assert o["summary"]["num_detections"] == 14 and o["summary"]["device"] == "cpu"
    assert o["categories"] == [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}]


def test_coco_results_and_file_table_agree(mixed_dir, tmp_path):
    d, _ = mixed_dir
    run([d], tmp_path / "out", FakeDetector(category_ids=[3, 17]))
    o = load_outputs(tmp_path / "out")
    files = {im["id"]: im for im in o["images"]}
    assert len(files) == len(o["images"])  # unique ids
    name_of = {c["id"]: c["name"] for c in o["categories"]}
    expected = sorted((line["image_id"], name, [b[0], b[1], b[2] - b[0], b[3] - b[1]], s)
                      for line in o["lines"]
                      for name, b, s in ((x["label"], x["box"], x["score"]) for x in line["detections"]))
    got = sorted((r["image_id"], name_of[r["category_id"]], r["bbox"], r["score"]) for r in o["coco"])
    assert got == expected
    for line in o["lines"]:
        im = files[line["image_id"]]
        assert (im["file_name"], im["width"], im["height"]) == (line["file"], line["width"], line["height"])
    # ids are positions in the sorted input list: stable, and errors leave gaps, not shifts
    all_files = [str(p) for p in find_images([str(d)])]
    assert all(all_files[im["id"] - 1] == im["file_name"] for im in o["images"])


def test_resume_skips_done_images_and_recovers_a_torn_journal(mixed_dir, tmp_path):
    d, good = mixed_dir
    out = tmp_path / "out"
    first, _ = run([d], out)
    reference = load_outputs(out)

    again, summary = run([d], out)
    assert again.calls == 0 and summary.num_skipped == len(good)  # errors are retried, cheaply
    assert load_outputs(out)["coco"] == reference["coco"]

    # A kill mid-write: drop the last two records, leave the first of them torn.
    journal = out / "partial" / "done.jsonl"
    lines = [x for x in journal.read_text().splitlines() if "error" not in json.loads(x)]
    journal.write_text("".join(x + "\n" for x in lines[:-2]) + lines[-2][:25])
    (out / "detections.json").unlink()
    resumed, summary = run([d], out, workers=1)
    assert resumed.calls == 2 and summary.num_skipped == len(good) - 2
    after = load_outputs(out)
    assert after["coco"] == reference["coco"] and after["lines"] == reference["lines"]
    for line in journal.read_text().splitlines():  # the torn fragment was cut, not glued to
        json.loads(line)

    # A complete last record without its newline is redone too (appending would glue to it).
    journal.write_text(journal.read_text().rstrip("\n"))
    resumed, _ = run([d], out, workers=1)
    assert resumed.calls == 1 and load_outputs(out)["lines"] == reference["lines"]

    # A failed file that was fixed is retried and leaves errors.json.
    Image.fromarray(rgb(30, 20)).save(d / "corrupt.jpg")
    resumed, _ = run([d], out, workers=1)
    assert resumed.calls == 1
    fixed = load_outputs(out)
    assert len(fixed["lines"]) == len(good) + 1
    assert {Path(e["file"]).name for e in fixed["errors"]} == {"empty.jpg", "notes.jpg", "readme.txt"}

    with pytest.raises(ValueError, match="score_threshold"):
        predict(FakeDetector(), [str(d)], out, score_threshold=0.8, proposal_settings={},
                workers=1, propose_fn=quadrant_proposals, progress=False)


def test_output_paths_never_leave_output_dir(tmp_path, monkeypatch):
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    odd = tmp_path / "elsewhere" / "we ird #name?\n..png"
    hidden = tmp_path / "in" / ".hidden.jpg"
    for i, p in enumerate([tmp_path / "in" / "a" / "x.jpg", odd, hidden]):
        Image.fromarray(rgb(40, 40, i)).save(p, format="PNG" if p.suffix == ".png" else "JPEG")
    monkeypatch.chdir(tmp_path / "in" / "a")
    inputs = ["../../in/a/../a/x.jpg", str(odd.resolve()), "../.hidden.jpg"]
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "out"
    _, summary = run(inputs, out, visualize=True)
    assert summary.num_images == 3
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(p.resolve().is_relative_to(out.resolve()) for p in written)
    vis = list((out / "vis").rglob("*.jpg"))
    assert len(vis) == 3 and not any(p.name.startswith(".") for p in vis)


@pytest.mark.parametrize("path,root", [
    ("/data/a/../../etc/passwd.jpg", "/data/a"),
    ("/x/y.jpg", "/completely/elsewhere"),
    ("/r/..jpg", "/r"), ("/r/..", "/r"), ("/r/.ssh/id.jpg", "/r"),
    ("/r/sub/na\x00me\\..\\..\\z.jpg", "/r"), ("/r/" + "long" * 80 + ".jpg", "/r"),
])
def test_safe_relative_name_stays_inside(path, root, tmp_path):
    name = safe_relative_name(path, root)
    target = os.path.normpath(os.path.join(tmp_path, name))
    assert not os.path.isabs(name) and ".." not in Path(name).parts
    assert target.startswith(str(tmp_path) + os.sep) and name.endswith(".jpg")
    assert all(len(part) <= 120 for part in Path(name).parts)


def test_safe_relative_name_keeps_plain_names_and_separates_lookalikes():
    assert safe_relative_name("/r/a/b.png", "/r") == "a/b.png.jpg"
    assert safe_relative_name("/r/a b.jpg", "/r") != safe_relative_name("/r/a_b.jpg", "/r")


def test_find_images_dirs_globs_files_sorted_unique(tmp_path):
    (tmp_path / "d" / "deep").mkdir(parents=True)
    for name in ["d/b.JPG", "d/a.webp", "d/deep/c.tif", "d/skip.txt", "top.jpeg"]:
        (tmp_path / name).write_bytes(b"x")
    found = find_images([str(tmp_path / "d"), str(tmp_path / "d" / "*.JPG"),
                         str(tmp_path / "*.jpeg"), str(tmp_path / "d" / "skip.txt")])
    names = [p.relative_to(tmp_path).as_posix() for p in found]
    assert names == sorted(names)
    assert names == ["d/a.webp", "d/b.JPG", "d/deep/c.tif", "d/skip.txt", "top.jpeg"]
    assert find_images([str(tmp_path / "**" / "*.tif")]) == [tmp_path / "d" / "deep" / "c.tif"]
    assert find_images([str(tmp_path)], exclude=tmp_path / "d") == [tmp_path / "top.jpeg"]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        find_images([str(tmp_path / "missing.jpg")])
    with pytest.raises(FileNotFoundError, match="nothing"):
        find_images([str(tmp_path / "nothing*.png")])
    with pytest.raises(FileNotFoundError, match="overrides go before --input"):
        find_images(["proposals.resize=100"])


def test_output_dir_inside_input_dir_is_not_read_back(tmp_path):
    for i in range(3):
        Image.fromarray(rgb(40, 48, i)).save(tmp_path / f"{i}.png")
    out = tmp_path / "results"
    run([tmp_path], out, visualize=True)
    _, summary = run([tmp_path], out, visualize=True)
    assert summary.num_inputs == 3 and summary.num_skipped == 3


def test_ranks_give_the_same_outputs(mixed_dir, tmp_path):
    d, _ = mixed_dir
    run([d], tmp_path / "one")
    calls = {}
    for rank in (1, 0):  # either rank may finish last; the merge reads both journals
        calls[rank] = run([d], tmp_path / "ranks", rank=rank, world_size=2)[0].calls
    assert calls[0] + calls[1] == 7 and min(calls.values()) >= 1  # the work was split
    reference = load_outputs(tmp_path / "one")
    for k in ("detections", "images", "errors"):
        assert json.loads((tmp_path / "ranks" / f"{k}.json").read_text()) == reference["coco" if k == "detections" else k], k
    assert {p.name for p in (tmp_path / "ranks" / "partial").glob("done*")} == {
        "done.rank0.jsonl", "done.rank1.jsonl"}


def test_real_selective_search(tmp_path):
    img = np.zeros((96, 128, 3), np.uint8)
    img[20:70, 30:90] = (220, 40, 40)
    Image.fromarray(img).save(tmp_path / "square.png")
    detector = FakeDetector()
    _, summary = run([tmp_path / "square.png"], tmp_path / "out", detector=detector,
                     propose_fn=None, proposal_settings={"resize": 0, "min_size": 5}, workers=1)
    assert summary.num_images == 1 and summary.num_errors == 0
    assert detector.calls == 1
    line = load_outputs(tmp_path / "out")["lines"][0]
    expected = selective_search(img, resize=0, min_size=5)  # [R, 4]: what the workers computed
    assert len(expected) >= 2
    cats = [d for d in line["detections"] if d["label"] == "cat"]
    assert len(cats) == 1  # the fake detector's cat 0.9 on proposal 0, unmoved (zero deltas)
    assert np.allclose(cats[0]["box"], expected[0], atol=1e-3)


def test_proposals_from_a_store_matched_by_file(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    names = ["b.png", "a.png", "c.png"]
    for i, name in enumerate(names):
        Image.fromarray(rgb(50, 60, i)).save(d / name)
    # Ids deliberately unlike sorted positions, and one box set per image that says which it is.
    ids = [30, 10, 20]
    boxes = [np.array([[i, i, 40 + i, 30 + i], [0, 0, 60, 50]], np.float32) for i in range(3)]
    store = tmp_path / "store"
    write_store(store, image_ids=ids, boxes_per_image=boxes, meta={"mode": "fast"},
                          files=[str((d / n).resolve()) for n in names])
    _, summary = run([d], tmp_path / "out", proposal_store=store, propose_fn=None)
    assert summary.num_images == 3
    for line in load_outputs(tmp_path / "out")["lines"]:
        i = names.index(Path(line["file"]).name)
        cat = [x for x in line["detections"] if x["label"] == "cat"]
        assert cat[0]["box"] == boxes[i][0].tolist()  # proposal 0 of that file's store entry

    Image.fromarray(rgb(50, 60, 9)).save(d / "new.png")
    with pytest.raises(ValueError, match="new.png"):
        run([d], tmp_path / "out2", proposal_store=store, propose_fn=None)


def test_cli_wires_flags_through(tmp_path, monkeypatch):
    from detect import commands
    from detect.cli import main

    detector = FakeDetector(category_ids=[7, 8], proposal_settings={"resize": 0, "min_size": 4})
    loaded = []
    monkeypatch.setattr(commands, "load_detector",
                        lambda checkpoint, device: loaded.append((str(checkpoint), device)) or detector)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    img = np.zeros((64, 80, 3), np.uint8)
    img[10:50, 20:60] = 255
    Image.fromarray(img).save(tmp_path / "one.png")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "*.png"),
            "--output-dir", str(out), "--score-threshold", "0.8", "--device", "cpu",
            "--workers", "1", "--visualize"]
    assert main(argv) == 0
    assert loaded == [(str(checkpoint), "cpu")] and detector.calls == 1
    o = load_outputs(out)
    assert [d["category_id"] for d in o["coco"]] == [7]  # only cat 0.9 is >= 0.8
    assert o["categories"] == [{"id": 7, "name": "cat"}, {"id": 8, "name": "dog"}]
    assert (out / "vis" / "one.png.jpg").is_file()
    checkpoint.write_bytes(b"other weights")  # another model: refuse to mix its results in
    assert main(argv) == 2


def test_links_keep_their_names_and_unsupported_files_are_listed(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(rgb(40, 48)).save(d / "good.png")
    Image.fromarray(rgb(40, 48, 1)).save(d / "anim.gif")  # an image, but not a supported type
    (d / "notes.txt").write_text("hello")
    os.symlink(tmp_path / "gone.png", d / "dangling.png")  # its target does not exist
    os.symlink(d / "good.png", d / "alias.png")
    _, summary = run([d], tmp_path / "out", workers=1)
    errors = json.loads((tmp_path / "out" / "errors.json").read_text())
    by_name = {Path(e["file"]).name: e["reason"] for e in errors}
    assert by_name["dangling.png"].startswith("broken symbolic link")  # the link, not gone.png
    assert str(tmp_path / "gone.png") in by_name["dangling.png"]
    assert by_name["anim.gif"] == by_name["notes.txt"] == "unsupported file type"
    assert len(errors) == 3 and summary.num_errors == 3
    images = json.loads((tmp_path / "out" / "images.json").read_text())
    assert sorted(Path(i["file_name"]).name for i in images) == ["alias.png", "good.png"]
    unsupported: list[Path] = []
    find_images([str(d)], unsupported=unsupported)
    assert [p.name for p in unsupported] == ["anim.gif", "notes.txt"]

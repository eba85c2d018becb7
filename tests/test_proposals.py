"""Selective search, the proposal store, batch generation (resume, shards) and recall."""

from __future__ import annotations

import inspect
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.common.config import PROPOSAL_CHOICES, ProposalConfig, check_proposal_settings, to_dict
from detect.data.datasets import Dataset, ImageRecord
from detect.data.images import read_image
from detect.proposals.store import BOXES_FILE, INDEX_FILE, META_FILE, ProposalStore, write_store
from detect.evaluation.recall import best_proposals, first_covering, proposal_recall
from detect.predict.outputs import PROPOSAL_RGB, REACHED_RGB, UNREACHED_RGB, draw_proposal_recall
from detect.proposals.batch import generate_proposals
from detect.proposals.selective_search import first_proposals, selective_search
from detect.proposals.ss import MODES

REPO = Path(__file__).resolve().parents[1]
# Small, fast settings for the batch tests: no resize, tiny min_size.
FAST = {"engine": "ours", "mode": "fast", "resize": 0, "resize_side": "width", "min_size": 4, "seed": 0,
        "ranking": "paper", "nms_iou": 0.7, "k_scale": 1.0}


def _scene(rng: np.random.Generator, height: int = 60, width: int = 80) -> np.ndarray:
    """A uint8 RGB [H, W, 3] image: a flat background, three coloured rectangles, mild noise."""
    image = np.empty((height, width, 3), np.int16)
    image[:] = rng.integers(0, 256, 3)
    for _ in range(3):
        x1, y1 = rng.integers(0, width - 12), rng.integers(0, height - 12)
        x2, y2 = x1 + rng.integers(8, width - x1 + 1), y1 + rng.integers(8, height - y1 + 1)
        image[y1:y2, x1:x2] = rng.integers(0, 256, 3)
    image += rng.integers(-6, 7, image.shape, dtype=np.int16)
    return image.clip(0, 255).astype(np.uint8)


def _write_images(folder: Path, count: int, seed: int = 0, **size) -> list[tuple[int, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(_scene(rng, **size)).save(path)
        items.append((i + 1, str(path.resolve())))
    return items


def _store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ---------------------------------------------------------------------------------------------
# selective_search
# ---------------------------------------------------------------------------------------------

def test_selective_search_boxes_are_valid_ranked_and_deterministic():
    rng = np.random.default_rng(1)
    image = _scene(rng, 90, 120)
    other = _scene(rng, 70, 50)
    boxes = selective_search(image, resize=200, min_size=10)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 20
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 90).all()
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    scale = 200 / 120  # original -> resized pixels: min_size applies in the resized image
    assert (widths * scale >= 10 - 1e-3).all() and (heights * scale >= 10 - 1e-3).all()
    assert (np.minimum(widths, heights) < 10).any()  # so a box under 10 original pixels may stay
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    # OpenCV ranks with C rand(): without re-seeding, a second call in the same process (after
    # another image advanced the generator) would come back in another order.
    selective_search(other, resize=200)
    again = selective_search(image, resize=200, min_size=10)
    np.testing.assert_array_equal(boxes, again)
    np.testing.assert_array_equal(first_proposals(boxes, 7), boxes[:7])  # proposals.top_k's one cut
    assert first_proposals(boxes, 0) is boxes  # 0 = all
    assert selective_search(image, resize=200, min_size=0).shape[0] > len(boxes)  # min_size drops some


def test_selective_search_boxes_are_in_original_pixels():
    # An exact 2x nearest-neighbour enlargement, proposed at the original width (INTER_AREA
    # averages each 2x2 block back to the original pixels), must give the original's boxes x 2.
    image = _scene(np.random.default_rng(2), 50, 70)
    big = image.repeat(2, axis=0).repeat(2, axis=1)  # [100, 140, 3]
    small_boxes = selective_search(image, resize=0, min_size=5)
    big_boxes = selective_search(big, resize=70, resize_side="width", min_size=5)
    assert len(small_boxes) > 10
    np.testing.assert_allclose(big_boxes, small_boxes * 2, atol=1e-4)
    # "longer" / "shorter" pick the side that is resized; the boxes stay in original pixels.
    tall = np.ascontiguousarray(big.transpose(1, 0, 2))  # [140, 100, 3]
    tall_small = np.ascontiguousarray(image.transpose(1, 0, 2))  # [70, 50, 3]
    np.testing.assert_allclose(selective_search(tall, resize=70, resize_side="longer", min_size=5),
                               selective_search(tall_small, resize=0, min_size=5) * 2, atol=1e-4)
    np.testing.assert_allclose(selective_search(big, resize=50, resize_side="shorter", min_size=5),
                               small_boxes * 2, atol=1e-4)


def test_selective_search_tiny_and_bad_images():
    for shape in [(1, 1, 3), (5, 5, 3), (2, 300, 3)]:
        boxes = selective_search(np.zeros(shape, np.uint8), resize=0)
        assert boxes.shape == (0, 4) and boxes.dtype == np.float32  # all under min_size
        boxes = selective_search(np.zeros(shape, np.uint8), resize=40, min_size=0)
        np.testing.assert_array_equal(boxes, [[0, 0, shape[1], shape[0]]])  # the whole image
    with pytest.raises(ValueError, match="uint8 RGB"):
        selective_search(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        selective_search(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="mode"):
        selective_search(np.zeros((10, 10, 3), np.uint8), mode="slow")


def test_image_kinds_through_read_image(tmp_path):
    rgb = _scene(np.random.default_rng(3), 40, 64)
    gray = Image.fromarray(rgb[:, :, 0])
    gray.save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray((rgb[:, :, 1].astype(np.uint16) * 257)).save(tmp_path / "deep.png")  # 16-bit
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display -> 40 wide, 64 tall
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    for name, (height, width) in [("gray.png", (40, 64)), ("rgba.png", (40, 64)),
                                  ("deep.png", (40, 64)), ("rotated.jpg", (64, 40))]:
        image = read_image(tmp_path / name)
        assert image.shape == (height, width, 3), name
        boxes = selective_search(image, resize=0, min_size=0)
        assert len(boxes) > 0, name
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all(), name
        assert [0, 0, width, height] in boxes.tolist(), name  # the final merge covers the image


def test_nms_ranking_moves_near_duplicates_behind_and_drops_nothing():
    import torch
    from torchvision.ops import nms

    image = _scene(np.random.default_rng(3), 90, 120)
    paper, paper_scores = selective_search(image, resize=0, min_size=4, return_scores=True)
    boxes, scores = selective_search(image, resize=0, min_size=4, ranking="nms", nms_iou=0.6,
                                     return_scores=True)
    assert len(boxes) == len(paper) > 30
    assert sorted(map(tuple, boxes.tolist())) == sorted(map(tuple, paper.tolist()))  # a permutation
    assert (np.diff(scores) >= 0).all()  # still ascending ranking values
    # the survivors of greedy NMS in the paper's order (torchvision's, with scores falling along
    # that order) come first, in that order; the suppressed follow, in that order too
    keep = nms(torch.from_numpy(paper).double(), -torch.arange(len(paper)).double(), 0.6).numpy()
    keep.sort()
    rest = np.setdiff1d(np.arange(len(paper)), keep)
    np.testing.assert_array_equal(boxes, paper[np.concatenate([keep, rest])])
    assert 0 < len(rest) < len(paper)
    with pytest.raises(ValueError, match="'ranking' must be paper or nms"):
        selective_search(image, ranking="size")


def test_k_scale_cuts_smaller_regions():
    image = _scene(np.random.default_rng(4), 90, 120)
    default = selective_search(image, resize=0, min_size=0)
    np.testing.assert_array_equal(selective_search(image, resize=0, min_size=0, k_scale=1.0), default)
    finer = selective_search(image, resize=0, min_size=0, k_scale=0.25)
    assert len(finer) > len(default)
    with pytest.raises(ValueError, match="k_scale"):
        selective_search(image, k_scale=0)


def test_proposal_settings_follow_config():
    cfg = ProposalConfig(mode="quality", resize=300, resize_side="longer", min_size=8, top_k=50)
    settings = to_dict(cfg)
    assert settings == {"engine": "ours", "mode": "quality", "resize": 300, "resize_side": "longer", "min_size": 8,
                        "top_k": 50, "seed": 0, "ranking": "paper", "nms_iou": 0.7, "k_scale": 1.0}
    # selective_search's keyword arguments are the config's fields but top_k (the detectors'
    # cut), with the same defaults
    parameters = inspect.signature(selective_search).parameters
    defaults = {name: p.default for name, p in parameters.items() if name not in ("image", "threads", "return_scores")}
    search = {k: v for k, v in to_dict(ProposalConfig()).items() if k != "top_k"}
    assert defaults == search
    assert set(MODES) == set(PROPOSAL_CHOICES["mode"])  # the engine's table has every mode the config takes
    # one rule for the config, a store's settings and the arguments: types, unknown keys, ranges
    assert check_proposal_settings({"mode": "single", "top_k": 5}) == {**search, "mode": "single"}
    with pytest.raises(ValueError, match="unknown key 'sigma'"):
        check_proposal_settings({"sigma": 0.8})
    for bad, message in [({"top_k": True}, "'top_k' must be an integer"),
                         ({"resize_side": "height"}, "'resize_side' must be width, longer or shorter"),
                         ({"nms_iou": 0.0}, r"'nms_iou' must be in \(0, 1\]"), ({"seed": -1}, "'seed' must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            check_proposal_settings(bad)
        if "top_k" not in bad:
            with pytest.raises(ValueError, match=message):
                selective_search(np.zeros((8, 8, 3), np.uint8), **bad)


# ---------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------

def _random_store(path: Path, counts: list[int], seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    boxes = {}
    for i, n in enumerate(counts):
        xy = rng.uniform(0, 100, (n, 2)).astype(np.float32)
        boxes[10 + 7 * i] = np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2)).astype(np.float32)], 1)
    write_store(path, image_ids=list(boxes), boxes_per_image=list(boxes.values()),
                meta={**FAST, "failures": []}, files=[f"/data/{i}.jpg" for i in boxes])
    return boxes


def test_store_round_trip(tmp_path):
    boxes = _random_store(tmp_path / "store", [5, 0, 2000, 1])
    store = ProposalStore(tmp_path / "store")
    assert len(store) == 4 and store.image_ids == list(boxes)
    assert store.meta["num_boxes"] == 2006 and store.meta["format"] == "detect-proposals"
    for image_id, expected in boxes.items():
        got = store.get(image_id)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
        assert image_id in store and store.num_boxes(image_id) == len(expected)
    got = store.get(10)
    got[:] = -1  # a copy: the store is unchanged
    np.testing.assert_array_equal(store.get(10), boxes[10])
    assert 11 not in store and "x" not in store
    with pytest.raises(KeyError, match=f"image id 11 is not in proposal store {tmp_path / 'store'}"):
        store.get(11)
    assert (tmp_path / "store" / BOXES_FILE).stat().st_size == 2006 * 16
    index = np.load(tmp_path / "store" / INDEX_FILE, allow_pickle=False)
    assert index.dtype == np.int64 and index.tolist()[2] == [24, 5, 2000]
    with pytest.raises(FileExistsError):
        _random_store(tmp_path / "store", [1])


def test_store_reads_one_image_without_loading_the_rest(tmp_path):
    # A sparse 4 GB boxes.f32 (250M boxes, 125k images; scores.f32 1 GB): opening and reading the last image
    # must not pull the file into memory.
    path = tmp_path / "big"
    _random_store(path, [1])
    per_image, num_images = 2000, 125_000
    num_boxes = per_image * num_images
    last = np.arange(per_image * 4, dtype=np.float32).reshape(per_image, 4)
    with open(path / BOXES_FILE, "wb") as f:
        f.truncate(num_boxes * 16)
        f.seek((num_boxes - per_image) * 16)
        f.write(last.tobytes())
    with open(path / "scores.f32", "wb") as f:
        f.truncate(num_boxes * 4)
    index = np.stack([np.arange(num_images), np.arange(num_images) * per_image,
                      np.full(num_images, per_image)], 1).astype(np.int64)
    with open(path / INDEX_FILE, "wb") as f:
        np.save(f, index)
    (path / "files.json").unlink()
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**meta, "num_images": num_images, "num_boxes": num_boxes}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    store = ProposalStore(path)
    np.testing.assert_array_equal(store.get(num_images - 1), last)
    assert not store.get(5).any()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500, f"reading two images of a 4 GB store grew the process by {grown_mib:.0f} MiB"


def test_store_rejects_damaged_folders(tmp_path):
    _random_store(tmp_path / "store", [3, 4])
    boxes_path = tmp_path / "store" / BOXES_FILE
    data = boxes_path.read_bytes()
    boxes_path.write_bytes(data[:-16])  # truncated by one box
    with pytest.raises(ValueError, match=f"{boxes_path}.*truncated"):
        ProposalStore(tmp_path / "store")
    boxes_path.write_bytes(data)
    ProposalStore(tmp_path / "store")
    scores_path = tmp_path / "store" / "scores.f32"
    scores_path.write_bytes(scores_path.read_bytes()[:-4])  # the ranking values are checked too
    with pytest.raises(ValueError, match=f"{scores_path}.*truncated"):
        ProposalStore(tmp_path / "store")

    meta_path = tmp_path / "store" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ValueError, match=f"{meta_path}.*format"):
        ProposalStore(tmp_path / "store")
    meta_path.write_text(json.dumps(meta))

    index_path = tmp_path / "store" / INDEX_FILE
    index = np.load(index_path)
    index[1, 1] = 5  # 5 + 4 boxes > 7
    np.save(index_path, index)
    with pytest.raises(ValueError, match=f"{index_path}.*row 1"):
        ProposalStore(tmp_path / "store")
    index_path.unlink()
    with pytest.raises(ValueError, match=f"{index_path}: missing"):
        ProposalStore(tmp_path / "store")
    with pytest.raises(FileNotFoundError, match="not found"):
        ProposalStore(tmp_path / "nowhere")


def test_store_checks_it_covers_the_dataset(tmp_path):
    _random_store(tmp_path / "store", [3, 4])  # ids 10, 17; files /data/10.jpg, /data/17.jpg
    store = ProposalStore(tmp_path / "store")

    def dataset(pairs):
        return Dataset("toy", [ImageRecord(i, f, 100, 100) for i, f in pairs], ["a"], [1])

    store.check_dataset(dataset([(10, "/elsewhere/10.jpg"), (17, "17.jpg")]))  # basenames match
    with pytest.raises(ValueError, match=r"lacks 2 of the 3 images.*\[5, 6\]"):
        store.check_dataset(dataset([(10, "10.jpg"), (5, "5.jpg"), (6, "6.jpg")]))
    with pytest.raises(ValueError, match="other files.*id 17: store '17.jpg', dataset 'x.jpg'"):
        store.check_dataset(dataset([(10, "10.jpg"), (17, "x.jpg")]))


# ---------------------------------------------------------------------------------------------
# generate_proposals
# ---------------------------------------------------------------------------------------------

def test_generate_records_failures_and_matches_direct_calls(tmp_path, capsys):
    items = _write_images(tmp_path / "images", 5)
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    items.insert(2, (99, str(tmp_path / "images" / "empty.png")))
    store = generate_proposals(items, tmp_path / "store", settings=FAST, workers=1, chunk_size=2,
                               progress=False)
    assert store.image_ids == [i for i, _ in items]
    assert store.meta["failures"] == [{"image_id": 99, "file": items[2][1], "reason": "empty file (0 bytes)"}]
    assert "1 of 6 images failed" in capsys.readouterr().err
    assert store.get(99).shape == (0, 4)
    for image_id, path in items[:2] + items[3:]:
        np.testing.assert_array_equal(store.get(image_id), selective_search(read_image(path), **FAST))
    assert not Path(f"{tmp_path / 'store'}.partial").exists()
    meta = store.meta
    assert {k: meta[k] for k in FAST} == FAST and meta["num_images"] == 6
    assert json.loads((tmp_path / "store" / "files.json").read_text())[2] == {"image_id": 99, "file": items[2][1]}
    assert store.files()[99] == items[2][1]

    # Same inputs and settings again: the finished store is returned, nothing recomputed.
    before = _store_bytes(tmp_path / "store")
    again = generate_proposals(items, tmp_path / "store", settings=FAST, workers=1, progress=False)
    assert again.image_ids == store.image_ids and _store_bytes(tmp_path / "store") == before
    with pytest.raises(ValueError, match="other images or settings.*min_size"):
        generate_proposals(items, tmp_path / "store", settings={**FAST, "min_size": 5}, progress=False)
    with pytest.raises(ValueError, match="all 2 images failed.*no store written"):
        generate_proposals([(1, items[2][1]), (2, str(tmp_path / "missing.png"))], tmp_path / "bad",
                           settings=FAST, workers=1, progress=False)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    with pytest.raises(ValueError, match="twice"):
        generate_proposals(items + items[:1], tmp_path / "other", settings=FAST, progress=False)
    with pytest.raises(ValueError, match="unknown key 'sigma'"):
        generate_proposals(items, tmp_path / "other", settings={**FAST, "sigma": 0.8}, progress=False)


def test_shards_and_worker_pool_match_a_single_process_run(tmp_path, capsys):
    items = _write_images(tmp_path / "images", 7)
    single = generate_proposals(items, tmp_path / "single", settings=FAST, workers=1, chunk_size=2,
                                progress=False)
    assert single is not None
    out = tmp_path / "sharded"
    assert generate_proposals(items, out, settings=FAST, workers=1, shard=(1, 2), chunk_size=2,
                              progress=False) is None
    assert "other shards' work" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in Path(f"{out}.partial").glob("chunk_*")) == [
        "chunk_000001.npz", "chunk_000003.npz"]
    # A resumed run must keep its chunking and settings.
    with pytest.raises(ValueError, match="other settings.*chunk_size"):
        generate_proposals(items, out, settings=FAST, shard=(0, 2), chunk_size=3, progress=False)
    merged = generate_proposals(items, out, settings=FAST, workers=2, shard=(0, 2), chunk_size=2,
                                progress=False)  # the last shard merges; this one uses a pool
    assert merged is not None and not Path(f"{out}.partial").exists()
    assert _store_bytes(out) == _store_bytes(tmp_path / "single")


def test_killed_run_resumes_to_an_identical_store(tmp_path):
    _write_images(tmp_path / "images", 12, height=120, width=160)
    env = {**os.environ, "DETECT_PROPOSAL_CHUNK": "2", "PYTHONPATH": str(REPO)}

    def propose(out: Path) -> subprocess.Popen:
        # Overrides go before --input (which takes every following word).
        cmd = [sys.executable, "-m", "detect", "propose", "proposals.resize=0", "proposals.min_size=8",
               "--input", str(tmp_path / "images"), "--out", str(out), "--workers", "1"]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = propose(tmp_path / "reference")
    assert reference.wait(timeout=120) == 0, reference.stderr.read()

    killed = propose(tmp_path / "store")
    partial = tmp_path / "store.partial"
    deadline = time.monotonic() + 60
    while not list(partial.glob("chunk_*.npz")) and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(list(partial.glob("chunk_*.npz")))
    assert 1 <= done < 6 and not (tmp_path / "store").exists()

    resumed = propose(tmp_path / "store")
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"{done} of 6 chunks already done" in err
    assert _store_bytes(tmp_path / "store") == _store_bytes(tmp_path / "reference")
    store = ProposalStore(tmp_path / "store")
    assert store.image_ids == list(range(1, 13)) and store.meta["min_size"] == 8
    assert "min_size: 8" in (tmp_path / "store" / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# Recall
# ---------------------------------------------------------------------------------------------

class _Proposals:
    def __init__(self, boxes: dict[int, list]):
        self.boxes = {k: np.asarray(v, np.float32).reshape(-1, 4) for k, v in boxes.items()}

    def get(self, image_id):
        return self.boxes[image_id]


def _record(image_id, boxes, classes, difficult=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return ImageRecord(image_id, f"{image_id}.png", 100, 100, boxes, np.asarray(classes, np.int64), difficult)


def test_recall_perfect_and_shifted_proposals():
    gt = [[0, 0, 10, 10], [20, 20, 40, 30]]
    dataset = Dataset("toy", [_record(1, gt, [1, 2]), _record(2, [], [])], ["a", "b"], [1, 2])
    perfect = proposal_recall(dataset, _Proposals({1: gt, 2: [[0, 0, 5, 5]]}), top_ks=(1, 10))
    assert perfect["top_k"] == [1, 10]
    assert perfect["recall@0.5"][1] == perfect["recall@0.7"][1] == perfect["AR"][1] == 1.0
    assert perfect["MABO"][1] == perfect["ABO"][1] == pytest.approx(1.0)
    assert perfect["recall@0.5"][0] == 0.5  # only the first proposal at k = 1
    assert perfect["avg_proposals"] == [1.0, 1.5]

    shifted = [[2, 0, 12, 10], [20, 20, 40, 30]]  # IoU 80 / 120 = 2/3 with the first GT box
    r = proposal_recall(dataset, _Proposals({1: shifted, 2: []}), top_ks=(10,))
    assert r["recall@0.5"] == [1.0] and r["recall@0.7"] == [0.5]
    assert r["ABO"][0] == pytest.approx((2 / 3 + 1) / 2)
    assert r["AR"][0] == pytest.approx((0.4 + 1.0) / 2)  # 2/3 passes 0.5, 0.55, 0.6, 0.65 of 10


def test_recall_matching_difficult_and_class_average():
    # One proposal over two identical GT boxes covers only one of them (one-to-one matching),
    # but both have best IoU 1; a difficult box is ignored; an image without proposals misses.
    box = [0, 0, 10, 10]
    records = [_record(1, [box, box, [50, 50, 60, 60]], [1, 1, 1], [False, False, True]),
               _record(2, [[30, 30, 60, 60]], [2])]
    dataset = Dataset("toy", records, ["a", "b"], [1, 2])
    r = proposal_recall(dataset, _Proposals({1: [box], 2: []}), top_ks=(5,))
    assert r["recall@0.5"] == [pytest.approx(1 / 3)]
    assert r["ABO"] == [pytest.approx(2 / 3)]  # (1 + 1 + 0) / 3 GT boxes
    assert r["MABO"] == [pytest.approx(0.5)]  # class a: 1, class b: 0
    empty = Dataset("none", [_record(1, [], [])], ["a"], [1])
    assert proposal_recall(empty, _Proposals({1: [box]}), top_ks=(5,))["recall@0.5"] == [-1.0]


def test_best_and_first_covering_proposals():
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    proposals = np.array([[0, 0, 10, 20], [1, 0, 10, 10], [0, 0, 10, 10], [40, 40, 45, 45]], np.float32)
    best, iou = best_proposals(proposals, gt)
    assert best.tolist() == [2, 0] and iou.tolist() == [1.0, 0.0]  # no overlap: index 0, IoU 0
    assert first_covering(proposals, gt, 0.5).tolist() == [0, -1]  # IoU 0.5 at rank 0 already
    assert first_covering(proposals, gt, 0.95).tolist() == [2, -1]
    assert best_proposals(np.zeros((0, 4)), gt)[0].tolist() == [-1, -1]


def test_recall_drawing_colours_reached_and_unreached_boxes():
    image = np.full((100, 120, 3), 128, np.uint8)
    gt = [[10, 10, 50, 50], [70, 60, 110, 90]]
    proposals = [[14, 10, 50, 50], [0, 0, 20, 20]]  # the first reaches box 1 (IoU 0.9); none box 2
    out = draw_proposal_recall(image, gt, proposals, min_side=1)  # min_side=1: not enlarged
    top = out.shape[0] - 100  # the caption strip
    assert out.shape[1] == 120 and top > 0 and (out[:top] == 255).mean() > 0.8
    assert tuple(out[top + 30, 10]) == REACHED_RGB  # box 1's left edge
    assert tuple(out[top + 75, 110]) == UNREACHED_RGB  # box 2's right edge
    assert tuple(out[top + 30, 14]) == PROPOSAL_RGB  # box 1's best proposal
    assert out.shape == draw_proposal_recall(image, gt, [], min_side=1).shape  # no proposal at all
    assert draw_proposal_recall(image, gt, proposals).shape[1] == round(120 * 512 / 100)  # enlarged


def test_cli_propose_and_recall_on_a_coco_dataset(tmp_path, capsys):
    from detect.cli import main
    from detect.data.datasets import load_coco

    items = _write_images(tmp_path / "images", 3)
    coco = {"images": [{"id": 10 + i, "file_name": f"{i:03d}.png", "width": 80, "height": 60} for i in range(3)],
            "annotations": [{"id": 1, "image_id": 10, "category_id": 5, "bbox": [5, 5, 30, 20], "iscrowd": 0},
                            {"id": 2, "image_id": 12, "category_id": 5, "bbox": [40, 10, 30, 40], "iscrowd": 0}],
            "categories": [{"id": 5, "name": "thing"}]}
    (tmp_path / "data.json").write_text(json.dumps(coco))
    store_dir, recall_json = tmp_path / "store", tmp_path / "recall.json"
    args = ["--data", str(tmp_path / "data.json"), "--images", str(tmp_path / "images")]
    assert main(["propose", *args, "--out", str(store_dir), "--workers", "1",
                 "proposals.resize=0", "proposals.min_size=4"]) == 0
    store = ProposalStore(store_dir)
    assert store.image_ids == [10, 11, 12] and store.meta["resize"] == 0
    np.testing.assert_array_equal(store.get(11), selective_search(read_image(items[1][1]), **FAST))
    assert main(["recall", *args, "--proposals", str(store_dir), "--out", str(recall_json), "--visualize", "5"]) == 0
    out = capsys.readouterr().out
    assert "recall@0.5" in out and "3 images, 2 GT boxes" in out
    drawn = sorted(p.name for p in (tmp_path / "recall_vis").iterdir())  # beside --out; images with GT
    assert drawn == ["000010_000.png.jpg", "000012_002.png.jpg"] and "wrote 2 drawing(s)" in out
    written = json.loads(recall_json.read_text())
    expected = proposal_recall(load_coco(tmp_path / "data.json", tmp_path / "images"), store)
    assert {k: written[k] for k in expected} == expected
    assert written["num_gt"] == 2 and written["avg_proposals_per_image"] == pytest.approx(store.meta["num_boxes"] / 3)
    assert main(["propose", *args, "--out", str(tmp_path / "x"), "--shard", "2/2"]) == 2
    assert "--shard '2/2'" in capsys.readouterr().err

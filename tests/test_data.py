"""Tests of the cluttered-digits generator and the generic image loader (fast, torch-free)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from PIL import Image  # noqa: E402

from gfnet_edge.data import (  # noqa: E402
    ClutteredDigits,
    ClutteredDigitsConfig,
    digit_crops,
    iter_image_batches,
    load_digit_source,
    load_images,
    normalize,
    render_sample,
    split_pool,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ClutteredDigitsConfig(image_size=96, seed=7)


def _digest(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- generator


def test_same_seed_same_bytes_in_any_order():
    ds = ClutteredDigits("train", size=6, config=SMALL)
    forward = ds.frames(range(6))
    backward = ds.frames(reversed(range(6)))[::-1]
    again = ClutteredDigits("train", size=6, config=ClutteredDigitsConfig(image_size=96, seed=7)).frames(range(6))
    assert forward.tobytes() == backward.tobytes() == again.tobytes()


def test_same_bytes_in_another_process():
    code = (
        "import hashlib, numpy as np\n"
        "from gfnet_edge.data import ClutteredDigits, ClutteredDigitsConfig\n"
        "f = ClutteredDigits('test', size=3, config=ClutteredDigitsConfig(image_size=96, seed=7)).frames(range(3))\n"
        "print(hashlib.sha256(np.ascontiguousarray(f).tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"})
    local = ClutteredDigits("test", size=3, config=SMALL).frames(range(3))
    assert out.stdout.strip() == _digest(local)


def test_different_seed_or_split_differs():
    a = ClutteredDigits("train", size=2, config=SMALL).frames([0, 1])
    b = ClutteredDigits("train", size=2, config=ClutteredDigitsConfig(image_size=96, seed=8)).frames([0, 1])
    c = ClutteredDigits("val", size=2, config=SMALL).frames([0, 1])
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])


def test_item_shapes_dtypes_labels_and_box():
    ds = ClutteredDigits("val", size=5, config=SMALL)
    assert len(ds) == 5
    for i in range(len(ds)):
        image, label, meta = ds[i]
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        assert isinstance(label, int) and 0 <= label <= 9
        row, col, h, w = meta["box"]
        assert 0 <= row and 0 <= col and h >= 1 and w >= 1 and row + h <= 96 and col + w <= 96
        assert meta["source"] in set(split_pool("val", SMALL).tolist())
        assert label == int(load_digit_source()[1][meta["source"]])
    assert np.array_equal(ds[-1][0], ds[4][0])
    with pytest.raises(IndexError):
        ds[5]


def test_default_size_224():
    image, label, meta = ClutteredDigits("test", size=1)[0]
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8


def test_split_pools_disjoint_and_cover_classes():
    cfg = ClutteredDigitsConfig()
    pools = {s: set(split_pool(s, cfg).tolist()) for s in ("train", "val", "test")}
    assert not pools["train"] & pools["val"]
    assert not pools["train"] & pools["test"]
    assert not pools["val"] & pools["test"]
    assert sum(len(p) for p in pools.values()) == len(load_digit_source()[1])
    labels = load_digit_source()[1]
    for pool in pools.values():
        assert set(labels[sorted(pool)].tolist()) == set(range(10))


def test_rendered_digits_come_from_their_split_pool():
    for split in ("train", "test"):
        pool = set(split_pool(split, SMALL).tolist())
        for i in range(20):
            assert render_sample(SMALL, split, i)[2]["source"] in pool


def test_size_mixture_follows_config():
    all_large = ClutteredDigitsConfig(image_size=96, large_fraction=1.0)
    all_small = ClutteredDigitsConfig(image_size=96, large_fraction=0.0)
    large = [render_sample(all_large, "train", i)[2] for i in range(4)]
    small = [render_sample(all_small, "train", i)[2] for i in range(4)]
    assert all(m["large"] for m in large) and not any(m["large"] for m in small)
    assert min(m["box"][2] for m in large) > max(m["box"][2] for m in small)


def test_arrays_cache_roundtrip(tmp_path):
    ds = ClutteredDigits("test", size=4, config=SMALL, cache_dir=tmp_path)
    frames, labels = ds.arrays(progress=False)
    assert frames.shape == (4, 96, 96, 3) and frames.dtype == np.uint8
    assert labels.shape == (4,) and labels.dtype == np.int64
    assert ds.cache_path().is_file()
    again, labels_again = ds.arrays(progress=False)
    assert np.array_equal(frames, again) and np.array_equal(labels, labels_again)
    assert np.array_equal(frames, ds.frames(range(4)))
    boxes, large = ds.boxes(progress=False)
    assert boxes.shape == (4, 4) and large.shape == (4,)
    assert [ds[i][1] for i in range(4)] == labels.tolist()


def test_digit_crops_contain_the_digit():
    ds = ClutteredDigits("train", size=3, config=SMALL)
    frames, labels, boxes, large = ds.render(range(3))
    crops = digit_crops(frames, boxes, patch_size=48)
    assert crops.shape == (3, 48, 48, 3) and crops.dtype == np.uint8
    for k, (row, col, h, w) in enumerate(boxes):
        top = min(max(row + h // 2 - 24, 0), 96 - 48)
        left = min(max(col + w // 2 - 24, 0), 96 - 48)
        assert np.array_equal(crops[k], frames[k, top:top + 48, left:left + 48])
    with pytest.raises(ValueError):
        digit_crops(frames, boxes, patch_size=97)


def test_config_hash_changes_with_parameters():
    assert ClutteredDigitsConfig().key() == ClutteredDigitsConfig().key()
    assert ClutteredDigitsConfig().key() != ClutteredDigitsConfig(seed=1).key()
    assert ClutteredDigitsConfig().key() != ClutteredDigitsConfig(large_fraction=0.5).key()


def test_bad_arguments():
    with pytest.raises(ValueError):
        ClutteredDigits("training")
    with pytest.raises(ValueError):
        ClutteredDigitsConfig(large_fraction=1.5)
    with pytest.raises(ValueError):
        ClutteredDigitsConfig(split_fractions=(0.8, 0.2, 0.2))


# ----------------------------------------------------------------------------- normalize


def test_normalize_matches_hand_computation():
    frames = np.array([[[[0, 128, 255], [10, 20, 30]]]], dtype=np.uint8)  # (1, 1, 2, 3)
    out = normalize(frames)
    assert out.shape == (1, 3, 1, 2) and out.dtype == np.float32
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = [(0, 128, 255), (10, 20, 30)]
    for x, pixel in enumerate(pixels):
        for c in range(3):
            expected = (pixel[c] / 255.0 - mean[c]) / std[c]
            assert out[0, c, 0, x] == pytest.approx(expected, abs=1e-6)
    assert normalize(frames[0]).shape == (3, 1, 2)
    with pytest.raises(ValueError):
        normalize(np.zeros((2, 4, 4), np.uint8))


# ----------------------------------------------------------------------------- loader


def _write_png(path: Path, size=(40, 30), colour=(10, 200, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_load_image_folder_with_classes(tmp_path):
    _write_png(tmp_path / "cat" / "a.png")
    _write_png(tmp_path / "cat" / "b.png")
    _write_png(tmp_path / "dog" / "c.jpg", colour=(1, 2, 250))
    frames, labels = load_images(tmp_path, image_size=16)
    assert frames.shape == (3, 16, 16, 3) and frames.dtype == np.uint8
    assert labels.tolist() == [0, 0, 1] and labels.dtype == np.int64
    assert tuple(frames[0, 8, 8]) == (10, 200, 30)


def test_hidden_files_and_folders_inside_class_folders_are_left_out(tmp_path):
    """Hidden entries at any depth of a class folder (a notebook's checkpoint copies, macOS's
    ``._`` files) are not images of the class, as in training (``gfnet_edge.train.folder_data``):
    both list the same files."""
    pytest.importorskip("torch")
    from gfnet_edge.train.folder_data import scan_split

    for split in ("train", "val"):
        _write_png(tmp_path / split / "cat" / "a.png")
        _write_png(tmp_path / split / "cat" / "deeper" / "b.png")
        _write_png(tmp_path / split / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png", colour=(1, 1, 1))
        _write_png(tmp_path / split / "cat" / "deeper" / "._b.png", colour=(1, 1, 1))
        _write_png(tmp_path / split / "dog" / "c.png", colour=(1, 2, 250))
        _write_png(tmp_path / split / ".hidden_class" / "d.png")
    frames, labels = load_images(tmp_path / "val", image_size=16)
    assert labels.tolist() == [0, 0, 1] and not (frames == 1).all(axis=(1, 2, 3)).any()
    listed = scan_split(tmp_path, "val", check=False)
    assert listed.classes == ["cat", "dog"]
    assert sorted(Path(f).relative_to(tmp_path / "val").as_posix() for f, _ in listed.samples) == \
        ["cat/a.png", "cat/deeper/b.png", "dog/c.png"]


def test_load_flat_folder_and_single_file(tmp_path):
    _write_png(tmp_path / "x.png", size=(64, 32))
    _write_png(tmp_path / "y.png", size=(32, 64))
    frames, labels = load_images(tmp_path, image_size=24, crop_pct=1.0, interpolation="bicubic")
    assert frames.shape == (2, 24, 24, 3) and labels is None
    frames, labels = load_images(tmp_path / "x.png", image_size=24)
    assert frames.shape == (1, 24, 24, 3) and labels is None


def test_unreadable_files_are_left_out_with_their_labels_when_on_error_takes_them(tmp_path):
    """With ``on_error`` a folder's unreadable files are reported and left out, and what remains is
    what the folder without them gives; without it the first one raises."""
    import shutil

    for name, colour in (("cat/a.png", (10, 200, 30)), ("cat/b.png", (200, 10, 30)), ("dog/c.png", (1, 2, 250)),
                         ("dog/d.png", (90, 90, 9))):
        _write_png(tmp_path / "full" / name, colour=colour)
    shutil.copytree(tmp_path / "full", tmp_path / "clean")
    (tmp_path / "full" / "cat" / "a2.png").write_bytes(b"not a png")
    (tmp_path / "full" / "dog" / "c2.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="a2.png: cannot read image"):
        load_images(tmp_path / "full", image_size=16)
    seen = []
    frames, labels = load_images(tmp_path / "full", image_size=16, on_error=lambda f, m: seen.append((f, m)))
    want_frames, want_labels = load_images(tmp_path / "clean", image_size=16)
    assert np.array_equal(frames, want_frames) and labels.tolist() == want_labels.tolist() == [0, 0, 1, 1]
    assert [Path(f).name for f, _ in seen] == ["a2.png", "c2.jpg"] and all("cannot read image" in m for _, m in seen)
    for f in (tmp_path / "clean").rglob("*.png"):
        f.write_bytes(b"x")
    with pytest.raises(ValueError, match="none of its 4 images can be read"):
        load_images(tmp_path / "clean", image_size=16, on_error=lambda f, m: None)


def test_with_files_names_the_file_of_each_frame_read(tmp_path):
    """``with_files`` gives each frame's file relative to the folder (unreadable files left out
    with their frames), the file's name for a single image, and ``None`` for an .npz; the frames
    and labels are those given without it."""
    colours = {"cat/a.png": (10, 200, 30), "cat/deeper/b.png": (200, 10, 30), "dog/c.png": (1, 2, 250)}
    for name, colour in colours.items():
        _write_png(tmp_path / "data" / name, colour=colour)
    (tmp_path / "data" / "cat" / "a2.png").write_bytes(b"not a png")
    frames, labels, files = load_images(tmp_path / "data", image_size=16, on_error=lambda f, m: None, with_files=True)
    assert files == ["cat/a.png", "cat/deeper/b.png", "dog/c.png"]
    for frame, label, f in zip(frames, labels, files):
        assert tuple(frame[8, 8]) == colours[f] and label == ["cat", "dog"].index(f.split("/")[0])
    plain = load_images(tmp_path / "data", image_size=16, on_error=lambda f, m: None)
    assert len(plain) == 2 and np.array_equal(plain[0], frames) and np.array_equal(plain[1], labels)
    assert load_images(tmp_path / "data" / "dog" / "c.png", image_size=16, with_files=True)[2] == ["c.png"]
    np.savez(tmp_path / "d.npz", images=frames, labels=labels)
    assert load_images(tmp_path / "d.npz", image_size=16, with_files=True)[2] is None


def test_image_batches_name_each_image_and_equal_load_images(tmp_path):
    _write_png(tmp_path / "imgs" / "cat" / "a.png")
    _write_png(tmp_path / "imgs" / "dog" / "c.jpg", colour=(1, 2, 250))
    _write_png(tmp_path / "x.png", size=(64, 32))
    np.savez(tmp_path / "a.npz", images=np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    paths = [tmp_path / "imgs", tmp_path / "a.npz", tmp_path / "x.png"]
    batches = list(iter_image_batches(paths, image_size=16, batch_size=2))
    assert [len(n) for n, _ in batches] == [2, 2, 1] and all(f.shape[0] == len(n) for n, f in batches)
    names = [x for n, _ in batches for x in n]
    assert names == [str(tmp_path / "imgs" / "cat" / "a.png"), str(tmp_path / "imgs" / "dog" / "c.jpg"),
                     f"{tmp_path / 'a.npz'}[0]", f"{tmp_path / 'a.npz'}[1]", str(tmp_path / "x.png")]
    want = np.concatenate([load_images(p, image_size=16)[0] for p in paths])
    assert np.array_equal(np.concatenate([f for _, f in batches]), want)
    with pytest.raises(ValueError, match="batch size must be a positive int"):
        next(iter_image_batches(paths, image_size=16, batch_size=0))
    with pytest.raises(ValueError, match="no such file"):  # every path is checked before the first batch
        next(iter_image_batches([tmp_path / "x.png", tmp_path / "missing.png"], image_size=16))


def test_image_batches_give_an_input_or_image_reached_twice_once_where_it_first_comes(tmp_path):
    """A folder given twice (spelled otherwise the second time), an archive given twice, a file
    of a folder given after it and a missing path given twice: each image comes once, in the
    order of its first place, and the missing path is reported once."""
    _write_png(tmp_path / "imgs" / "a.png")
    _write_png(tmp_path / "imgs" / "b.png", colour=(1, 2, 250))
    _write_png(tmp_path / "x.png", size=(64, 32))
    np.savez(tmp_path / "a.npz", images=np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    imgs, npz, missing = tmp_path / "imgs", tmp_path / "a.npz", tmp_path / "missing.png"
    failed = []
    paths = [tmp_path / "x.png", imgs, npz, missing, tmp_path / "imgs" / ".." / "imgs", imgs / "b.png", npz, missing,
             tmp_path / "." / "x.png"]
    batches = list(iter_image_batches(paths, image_size=16, batch_size=2, on_error=lambda n, m: failed.append(n)))
    names = [x for n, _ in batches for x in n]
    assert names == [str(tmp_path / "x.png"), str(imgs / "a.png"), str(imgs / "b.png"), f"{npz}[0]", f"{npz}[1]"]
    assert failed == [str(missing)]
    want = np.concatenate([load_images(p, image_size=16)[0] for p in (tmp_path / "x.png", imgs, npz)])
    assert np.array_equal(np.concatenate([f for _, f in batches]), want)


def test_load_npz_uint8_and_float(tmp_path):
    rng = np.random.default_rng(0)
    uint8 = rng.integers(0, 256, size=(3, 20, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", images=uint8, labels=np.array([2, 0, 1]))
    frames, labels = load_images(tmp_path / "u.npz", image_size=20)
    assert np.array_equal(frames, uint8) and labels.tolist() == [2, 0, 1]
    unit = np.moveaxis(uint8, -1, 1).astype(np.float32) / 255.0
    np.savez(tmp_path / "f.npz", images=unit)
    frames, labels = load_images(tmp_path / "f.npz", image_size=20)
    assert np.array_equal(frames, uint8) and labels is None
    np.savez(tmp_path / "n.npz", images=normalize(uint8))
    frames, _ = load_images(tmp_path / "n.npz", image_size=20)
    assert np.abs(frames.astype(int) - uint8).max() <= 1
    frames, _ = load_images(tmp_path / "u.npz", image_size=10, crop_pct=1.0)
    assert frames.shape == (3, 10, 10, 3)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("empty", "no images found"),
    ("corrupt", "cannot read image"),
    ("no_key", "no 'images'"),
    ("bad_shape", "must be"),
    ("nan", "NaN"),
    ("bad_labels", "'labels'"),
    ("not_zip", "cannot read .npz"),
])
def test_loader_errors(tmp_path, case, message):
    target = tmp_path / "data"
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "empty":
        target.mkdir()
        (target / "notes.txt").write_text("not an image")
    elif case == "corrupt":
        target.mkdir()
        _write_png(target / "good.png")
        (target / "bad.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    else:
        target = tmp_path / "data.npz"
        images = np.zeros((2, 8, 8, 3), np.uint8)
        if case == "no_key":
            np.savez(target, frames=images)
        elif case == "bad_shape":
            np.savez(target, images=np.zeros((2, 8, 8), np.uint8))
        elif case == "nan":
            bad = np.zeros((2, 3, 8, 8), np.float32)
            bad[1, 0, 2, 2] = np.nan
            np.savez(target, images=bad)
        elif case == "bad_labels":
            np.savez(target, images=images, labels=np.array([0, 1, 2]))
        elif case == "not_zip":
            target.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=message) as info:
        load_images(target, image_size=8)
    assert str(target.name) in str(info.value)


@pytest.mark.parametrize("size, crop_pct, interpolation", [
    ((331, 277), 1.0, "bilinear"), ((400, 300), 1.0, "bicubic"), ((300, 400), 1.0, "bilinear"),
    ((640, 480), 1.0, "bicubic"), ((331, 277), 0.875, "bicubic"), ((257, 250), 0.875, "bilinear"),
])
def test_resize_and_centre_crop_equal_torchvision_and_the_extension(size, crop_pct, interpolation):
    """Files (``predict``, ``calibrate --data``) are prepared as torchvision's ``Resize(int(S /
    crop_pct))`` + ``CenterCrop(S)`` on the Pillow image prepares them (the longer side truncated,
    docs/gfnet.md), and so within one level of the extension's ``resize_crop``, which prepares the
    frames given to ``Runtime.predict``: the same pixels, not a copy shifted by one."""
    T = pytest.importorskip("torchvision.transforms")
    from gfnet_edge import ops
    from gfnet_edge.data.images import preprocess

    w, h = size
    image = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    want = np.asarray(T.Compose([T.Resize(int(224 / crop_pct), mode), T.CenterCrop(224)])(image))
    got = preprocess(image, 224, crop_pct, interpolation)
    np.testing.assert_array_equal(got, want)
    ext = ops.resize_crop(np.asarray(image)[None], 224, crop_pct=crop_pct, interpolation=interpolation)[0]
    assert np.abs(ext.astype(int) - got).max() <= 1

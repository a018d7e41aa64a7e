"""Training's image transform (gfnet_edge.train.folder_data): torchvision's crops and flips on
ordinary images, the image loader's frames for validation, bounded memory on very long images."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("torchvision.transforms")
from PIL import Image  # noqa: E402

from gfnet_edge.data.images import load_images  # noqa: E402
from gfnet_edge.train.folder_data import FolderDataset, FolderSplit, build_transform  # noqa: E402


def _torchvision(S, crop_pct, interpolation, train, random_crop, hflip):
    """The transform as torchvision composes it: Resize(int(S / crop_pct)) on the Pillow image,
    a random or centre S x S crop, an optional random flip."""
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    steps = [T.Resize(int(S / crop_pct), interpolation=mode, antialias=True),
             T.RandomCrop(S) if (train and random_crop) else T.CenterCrop(S)]
    if train and hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.PILToTensor()])


def _smooth(h, w, seed):
    """An RGB image of low-frequency ramps (no resampling overshoot to clip)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rng = np.random.default_rng(seed)
    chans = [127 + 100 * np.sin(x / rng.uniform(30, 80) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(3, 9)) for _ in range(3)]
    return Image.fromarray(np.clip(np.stack(chans, -1), 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("seed", range(6))
def test_crops_and_flips_equal_torchvision_on_ordinary_images(seed):
    """Random sizes, crop ratios and filters: every split's item is torchvision's bit for bit, and the
    random generator is left where torchvision leaves it (the same draws, so the next image's crop
    is the same too)."""
    rng = np.random.default_rng(seed)
    for k in range(12):
        h, w = (int(v) for v in rng.integers(12, 260, 2))
        if max(h, w) > 2 * min(h, w):  # a long image: see the tests below
            h = w = max(h, w)
        S = int(rng.integers(8, 64))
        crop_pct = float(rng.choice([0.875, 0.9, 1.0]))
        interp = ("bilinear", "bicubic")[k % 2]
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for train, random_crop, hflip in ((True, True, True), (True, True, False), (True, False, True), (False, True, True)):
            ref = _torchvision(S, crop_pct, interp, train, random_crop, hflip)
            new = build_transform(S, crop_pct, interp, train, random_crop, hflip)
            torch.manual_seed(seed * 100 + k)
            want, after_want = ref(img), torch.rand(1)
            torch.manual_seed(seed * 100 + k)
            got, after_got = new(img), torch.rand(1)
            assert got.dtype == torch.uint8 and got.shape == (3, S, S)
            assert torch.equal(got, want), (h, w, S, crop_pct, interp, train, random_crop, hflip)
            assert after_got == after_want


def test_random_crops_of_a_long_image_are_the_full_resizes_crops(tmp_path):
    """A 10 x 400 image (resized 40 x 1600 at S = 32): the crop at each drawn offset is the full
    resize's crop at that offset, within 2 levels (only the crop's source box is resampled, which
    may change Pillow's order of passes); every position of the long side is reachable."""
    img = _smooth(10, 400, 1)
    for interp in ("bilinear", "bicubic"):
        ref = _torchvision(32, 0.8, interp, True, True, False)
        new = build_transform(32, 0.8, interp, True, True, False)
        lefts = set()
        for s in range(40):
            torch.manual_seed(s)
            want = ref(img)
            torch.manual_seed(s)
            got = new(img)
            assert (got.int() - want.int()).abs().max() <= 2
            torch.manual_seed(s)
            torch.randint(0, 40 - 32 + 1, size=(1,))
            lefts.add(int(torch.randint(0, 1600 - 32 + 1, size=(1,))))
        assert max(lefts) > 1200 and min(lefts) < 400


def test_validation_items_are_the_image_loaders_frames(tmp_path):
    """What training validates on is what `calibrate --data` / `evaluate` read from the same files,
    long images included."""
    rng = np.random.default_rng(3)
    files = []
    for i, (h, w) in enumerate(((64, 90), (3, 700), (500, 4), (40, 40))):
        d = tmp_path / "val" / f"c{i}"
        d.mkdir(parents=True)
        f = d / "x.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f)
        files.append((str(f), i))
    for interp, crop_pct in (("bilinear", 0.875), ("bicubic", 1.0)):
        ds = FolderDataset(FolderSplit(tmp_path / "val", [f"c{i}" for i in range(4)], files),
                           build_transform(32, crop_pct, interp, False), augmented=False)
        frames, labels = load_images(tmp_path / "val", 32, crop_pct, interp)
        for i in range(4):
            x, label, _ = ds[i]
            assert np.array_equal(x.permute(1, 2, 0).numpy(), frames[list(labels).index(label)])


def test_a_very_long_image_is_not_resized_whole(tmp_path):
    """A 2 x 4000 image at S = 224: the full resize would be 256 x 512000 (393 MB); training's
    transform stays within tens of MB of the process's size before, for train and val items."""
    f = tmp_path / "long.png"
    _smooth(2, 4000, 2).save(f)
    code = textwrap.dedent(f"""
        import resource, torch
        from gfnet_edge.data.images import open_rgb
        from gfnet_edge.train.folder_data import build_transform
        img = open_rgb({str(f)!r})
        t = [build_transform(224, 0.875, m, train) for m in ("bilinear", "bicubic") for train in (False, True)]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for tr in t:
            x = tr(img)
            assert tuple(x.shape) == (3, 224, 224)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grown_mb = float(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 60, grown_mb


def test_an_offset_outside_the_resized_image_is_refused():
    from gfnet_edge.data.images import preprocess

    img = _smooth(40, 60, 0)  # resized 32 x 48 at S = 32, crop_pct 1
    assert preprocess(img, 32, 1.0, "bilinear", offset=(0, 16)).shape == (32, 32, 3)
    for offset in ((1, 0), (0, 17), (-1, 0)):
        with pytest.raises(ValueError, match="outside the 48x32 resized image"):
            preprocess(img, 32, 1.0, "bilinear", offset=offset)

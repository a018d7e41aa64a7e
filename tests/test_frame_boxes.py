"""Patch boxes on the original frame: ``ops.crop_geometry`` says where the S x S input sits in a
frame, checked against where the extension's resize and centre crop really put a white
rectangle; ``Predictions.frame_boxes`` maps each focus patch onto the frame the runtime resized
(or the one named for cropped frames); ``gfnet-edge predict --json`` gives them per image file."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gfnet_edge import ops
from gfnet_edge.errors import InputError
from gfnet_edge.runtime import Runtime


def _white_box(h: int, w: int, box) -> np.ndarray:
    frame = np.zeros((h, w, 3), np.uint8)
    t, l, b, r = box
    frame[t:b, l:r] = 255
    return frame


def _extent(crop: np.ndarray):
    """(top, left, bottom, right) of the pixels over half white in a cropped frame."""
    on = crop[..., 0] > 127
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    return rows[0], cols[0], rows[-1] + 1, cols[-1] + 1


@pytest.mark.parametrize("h, w, S, crop_pct, box, interpolation", [
    (480, 640, 64, 0.875, (200, 260, 300, 380), "bilinear"),   # landscape, downscaled
    (900, 301, 96, 0.875, (400, 90, 520, 200), "bicubic"),     # portrait, odd sizes
    (50, 70, 96, 1.0, (15, 20, 35, 55), "bilinear"),           # upscaled
    (333, 333, 32, 0.5, (150, 150, 190, 170), "bicubic"),      # square, a small centre
])
def test_crop_geometry_maps_the_crop_back_where_the_kernel_cut_it(h, w, S, crop_pct, box, interpolation):
    """A white rectangle found in the kernel's S x S output, mapped back with the geometry,
    lands on the rectangle drawn in the frame, to within one resized pixel."""
    frame = _white_box(h, w, box)
    crop = ops.resize_crop(frame, S, crop_pct, interpolation)[0]
    geometry = ops.crop_geometry(h, w, S, crop_pct)
    assert geometry.crop == S and min(geometry.resized) == ops.resize_size(S, crop_pct)
    assert 0 <= geometry.top <= geometry.resized[0] - S and 0 <= geometry.left <= geometry.resized[1] - S
    mapped = geometry.to_frame(_extent(crop))
    pixel = np.array([h / geometry.resized[0], w / geometry.resized[1]] * 2)  # one resized pixel, in frame pixels
    assert np.all(np.abs(mapped - np.array(box)) <= pixel + 1e-9), (mapped, box, pixel)
    # the whole crop lies inside the frame
    whole = geometry.to_frame([0, 0, S, S])
    assert whole[0] >= 0 and whole[1] >= 0 and whole[2] <= h + 1e-9 and whole[3] <= w + 1e-9


def test_crop_geometry_refuses_bad_sizes():
    with pytest.raises(ValueError, match="height"):
        ops.crop_geometry(0, 10, 8)
    with pytest.raises(ValueError, match="crop_pct"):
        ops.crop_geometry(10, 10, 8, 1.5)
    with pytest.raises(ValueError, match="4 values"):
        ops.crop_geometry(10, 10, 8).to_frame([1, 2, 3])


@pytest.fixture(scope="module")
def spread_bundle(tmp_path_factory):
    """A random mobilenetv3 GFNet (S 224, P 96, crop 0.875) whose policy spreads its patches."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from gfnet_edge.build import BuildConfig, build_bundle
    from gfnet_edge.models import GFNet, save_checkpoint
    from gfnet_edge.variants import released_spec

    torch.manual_seed(0)
    model = GFNet(released_spec("mobilenetv3_large_100"))
    with torch.no_grad():
        model.policy.actor[0].weight.mul_(50)
    d = tmp_path_factory.mktemp("frame_boxes")
    ck = save_checkpoint(d / "m.pth.tar", model)
    return build_bundle(ck, d / "bundle", BuildConfig(precision="fp32", backend="onnxruntime"), progress=False)


def test_frame_boxes_of_frames_the_runtime_resized(spread_bundle):
    """Frames of two sizes in one call: each row's frame boxes are its boxes shifted by the crop
    offset and scaled by frame / resized size, worked out by hand for a frame twice the resize
    size (a 0.5 resize: boxes doubled) and one of 300 x 600 (resized to 256 x 512)."""
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (512, 512, 3), np.uint8), rng.integers(0, 256, (300, 600, 3), np.uint8)]
    with Runtime(spread_bundle, backend="onnxruntime", precision="fp32") as rt:
        preds = rt.predict(frames, budget=None)
        cropped = rt.predict(ops.resize_crop(frames, 224, 0.875, "bilinear"), cropped=True)
        images = rt.predict(ops.preprocess(frames, 224, 0.875, "bilinear"))
    np.testing.assert_array_equal(preds.frame_sizes, [[512, 512], [300, 600]])
    assert preds[0]["boxes"], "the bundle has no budgets: every focus step runs"
    # 512 x 512 -> 256 x 256, crop at (16, 16); scale 2
    assert preds[0]["frame_boxes"] == [tuple(2.0 * (v + 16) for v in b) for b in preds[0]["boxes"]]
    # 300 x 600 -> 256 x 512 (scale 300 / 256 on both axes), crop at (16, 144)
    k = 300 / 256
    expected = [((t + 16) * k, (l + 144) * k, (b + 16) * k, (r + 144) * k) for t, l, b, r in preds[1]["boxes"]]
    np.testing.assert_allclose(preds[1]["frame_boxes"], expected, rtol=1e-12)
    # cropped frames and normalised images: same boxes, the frame size has to be named
    for other in (cropped, images):
        assert other.frame_sizes is None and "frame_boxes" not in other[0]
        assert other[1]["boxes"] == preds[1]["boxes"]
        assert other.frame_boxes(1, frame_size=(300, 600)) == preds.frame_boxes(1)
        with pytest.raises(InputError, match=r"give frame_size=\(height, width\)"):
            other.frame_boxes(0)
    with pytest.raises(InputError, match="frame_size must be"):
        cropped.frame_boxes(0, frame_size=512)


def test_frame_boxes_of_an_image_that_exits_at_the_glance_are_empty(spread_bundle):
    with Runtime(spread_bundle, backend="onnxruntime", precision="fp32") as rt:
        rt.thresholds = [0.0] * (rt.model.steps - 1) + [-1e8]  # every image exits at the glance
        preds = rt.predict(np.zeros((2, 100, 90, 3), np.uint8))
    assert preds[0]["exit_step"] == 0 and preds[0]["boxes"] == [] == preds[0]["frame_boxes"]
    np.testing.assert_array_equal(preds.frame_sizes, [[100, 90]] * 2)


def test_predict_json_gives_frame_boxes_on_the_image_files(spread_bundle, tmp_path):
    """The CLI reads files as cropped frames; its JSON rows still map boxes onto each file."""
    from PIL import Image

    rng = np.random.default_rng(4)
    for name, (h, w) in {"a.png": (512, 512), "b.png": (300, 600)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(tmp_path / name)
    run = subprocess.run([sys.executable, "-m", "gfnet_edge", "predict", str(spread_bundle.root),
                          str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["frame_size"] for r in rows] == [[512, 512], [300, 600]]
    assert rows[0]["frame_boxes"] == [[2.0 * (v + 16) for v in b] for b in rows[0]["boxes"]]
    k = 300 / 256
    np.testing.assert_allclose(rows[1]["frame_boxes"],
                               [[(t + 16) * k, (l + 144) * k, (b + 16) * k, (r + 144) * k]
                                for t, l, b, r in rows[1]["boxes"]], rtol=1e-12)


def test_loader_geometry_is_in_pixels_of_the_file(tmp_path, monkeypatch):
    """A JPEG decoded at a reduced scale (over the pixel limit) still gets its geometry in the
    file's own pixels: it agrees with the full decode's to within the reduced decode's pixel; an
    archived S x S image is taken as it is (identity), a larger one is resized and cropped."""
    from PIL import Image

    from gfnet_edge.data import images

    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (400, 640, 3), np.uint8)).save(tmp_path / "big.jpg", quality=90)
    np.savez(tmp_path / "cut.npz", images=rng.integers(0, 256, (2, 32, 32, 3), np.uint8))
    np.savez(tmp_path / "raw.npz", images=rng.integers(0, 256, (1, 40, 80, 3), np.uint8))
    paths = [tmp_path / "big.jpg", tmp_path / "cut.npz", tmp_path / "raw.npz"]

    def geometries():
        (names, frames, placed), = images.iter_image_batches(paths, 32, 0.875, "bilinear", batch_size=8, placed=True)
        assert len(names) == len(frames) == len(placed) == 4
        return placed

    full = geometries()
    monkeypatch.setattr(images, "MAX_PIXELS", 400 * 640 // 10)  # the JPEG is now decoded at 1/4 scale
    reduced = geometries()
    assert full[0].frame == reduced[0].frame == (400, 640) and reduced[0].resized == full[0].resized
    whole = [0, 0, 32, 32]
    np.testing.assert_allclose(reduced[0].to_frame(whole), full[0].to_frame(whole), atol=4.0)
    for g in full[1:3]:
        assert g.frame == (32, 32) and g.to_frame(whole).tolist() == whole
    assert full[3] == ops.crop_geometry(40, 80, 32, 0.875)

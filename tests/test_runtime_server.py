"""Runtime as a long-running service uses it: frames in any memory layout, argument values at
their limits, and a Runtime inherited by a forked worker process."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from gfnet_edge.errors import InputError
from gfnet_edge.runtime import Runtime


@pytest.fixture(scope="module")
def demo_frames(demo_onnx_bundle):
    """uint8 frames of the demo task's test split at the model's input size (S x S: the
    model's crop_pct is 1, so the runtime takes them without a resize)."""
    from gfnet_edge.data import ClutteredDigits, demo_config

    model = demo_onnx_bundle.model
    frames, _ = ClutteredDigits("test", config=demo_config(model)).arrays(6, progress=False)
    assert frames.shape[1:] == (model.image_size, model.image_size, 3)
    return frames


def _same(a, b) -> None:
    for f in ("classes", "exit_step", "coords", "confidence"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


@pytest.mark.parametrize("layout", ["fortran", "transposed"])
@pytest.mark.parametrize("cropped", [False, True])
def test_frames_in_any_memory_layout_give_the_answers_of_their_contiguous_copies(demo_onnx_bundle, demo_frames,
                                                                                 layout, cropped):
    """An S x S frame that is not C-contiguous (Fortran order, or a transposed view as a
    rotated camera image is) is classified like its C-contiguous copy, alone or in a list."""
    frames = [np.asfortranarray(f) if layout == "fortran" else np.ascontiguousarray(f.transpose(1, 0, 2)).transpose(1, 0, 2)
              for f in demo_frames]
    assert not any(f.flags.c_contiguous for f in frames)
    with Runtime(demo_onnx_bundle.root, backend="onnxruntime", precision="fp32", threads=1) as rt:
        want = rt.predict(demo_frames, cropped=cropped)
        _same(rt.predict(frames, cropped=cropped), want)
        one = rt.predict(frames[2], cropped=cropped)
        assert one.classes[0] == want.classes[2] and one.exit_step[0] == want.exit_step[2]
        np.testing.assert_array_equal(rt.trace(frames, cropped=cropped).probs,
                                      rt.trace(demo_frames, cropped=cropped).probs)

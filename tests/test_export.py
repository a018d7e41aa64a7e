"""ONNX export: graph contract and FP32 parity with the PyTorch modules."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from gfnet_edge.export import DEFAULT_OPSET, BackboneGraph, export_model, head_arrays
from gfnet_edge.models import GFNet
from gfnet_edge.variants import released_spec


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "regnety_600m", "densenet121"])
def test_fp32_parity_and_contract(tmp_path, name):
    torch.manual_seed(0)
    model = GFNet(released_spec(name))
    paths = export_model(model, tmp_path)
    x = torch.randn(3, 3, 96, 96)
    for which in ("glance", "focus"):
        proto = onnx.load(str(paths[which]))
        onnx.checker.check_model(proto)
        assert proto.opset_import[0].version == DEFAULT_OPSET
        assert [i.name for i in proto.graph.input] == ["image"]
        graph = BackboneGraph(model, which).eval()
        assert [o.name for o in proto.graph.output] == graph.output_names
        # dynamic batch axis
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
        sess = ort.InferenceSession(str(paths[which]), providers=["CPUExecutionProvider"])
        for batch in (x[:1], x):
            outs = sess.run(None, {"image": batch.numpy()})
            with torch.no_grad():
                refs = graph(batch)
            for o, r in zip(outs, refs):
                r = r.numpy()
                assert o.shape == r.shape
                assert np.abs(o - r).max() <= 1e-4 * max(np.abs(r).max(), 1e-6)
    expected_logits = model.spec.step0 == "backbone"
    assert ("logits" in BackboneGraph(model, "glance").output_names) == expected_logits


def test_head_arrays_layout():
    model = GFNet(released_spec("resnet50"))
    h = head_arrays(model)
    assert h["cls.w_ih"].shape == (3 * 1024, 2048) and h["cls.fc.w"].shape == (1000, 1024)
    assert h["pol.actor.w"].shape == (2, 1024) and h["pol.w_hh"].shape == (3 * 1024, 1024)
    np.testing.assert_array_equal(h["cls.b_hh"], model.fc.rnn.bias_hh_l0.detach().numpy())
    m2 = GFNet(released_spec("mobilenetv3_large_100"))
    h2 = head_arrays(m2)
    assert {"cls.fc_2.w", "cls.fc_3.w"} <= set(h2) and "cls.fc_4.w" not in h2
    assert h2["cls.fc_3.w"].shape == (1000, 3 * 1280)

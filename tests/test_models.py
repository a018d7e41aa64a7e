"""The reference GFNet: every released variant, trace semantics, MACs, custom backbones."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from gfnet_edge.models import GFNet, count_step_macs, crop_patches, glance_input, action_to_coords
from gfnet_edge.variants import VARIANTS, GFNetSpec, released_spec

from reference_loop import reference_trace

ALL = [(name, P) for name, v in VARIANTS.items() for P in v.patch_sizes]

# docs/gfnet.md ("Cost per step"): backbone multiply-adds per variant and patch size (millions).
SPEC_MACS = {
    ("resnet50", 96): 751, ("resnet50", 128): 1335, ("mobilenetv3_large_100", 96): 41.8,
    ("mobilenetv3_large_100", 128): 72.1, ("regnety_600m", 96): 111, ("regnety_800m", 96): 147,
    ("regnety_1.6g", 96): 297, ("densenet121", 96): 520, ("densenet169", 96): 617,
    ("densenet201", 96): 788, ("efficientnet_b2", 128): 216, ("efficientnet_b3", 128): 315,
    ("efficientnet_b3", 144): 431,
}
# the same table's "static model at full S" column (millions)
STATIC_MACS = {"resnet50": 4089, "mobilenetv3_large_100": 217, "efficientnet_b2": 994, "efficientnet_b3": 1827}


def _spread(model):
    """Random weights give near-constant actions; widen the actor so patches move around."""
    with torch.no_grad():
        model.policy.actor[0].weight.mul_(50.0)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name,P", ALL)
def test_released_variant_traces_like_reference_loop(name, P):
    torch.manual_seed(0)
    spec = released_spec(name, P)
    model = _spread(GFNet(spec))
    v = VARIANTS[name]
    images = torch.randn(2, 3, v.image_size, v.image_size)
    tr = model.trace(images)
    assert tr.probs.shape == (v.steps, 2, 1000)
    assert tr.coords.shape == (v.steps - 1, 2, 2) and tr.coords.dtype == torch.int32
    assert int(tr.coords.min()) >= 0 and int(tr.coords.max()) <= v.image_size - P
    ref_probs, ref_coords = reference_trace(model, images)
    torch.testing.assert_close(tr.probs, ref_probs, rtol=0, atol=1e-6)
    assert torch.equal(tr.coords, ref_coords)
    assert spec.feature_dim == model.spec.feature_dim == v.feature_dim
    if (name, P) in SPEC_MACS:  # multiply-adds within 2% of docs/gfnet.md's table
        assert count_step_macs(model).backbone / 1e6 == pytest.approx(SPEC_MACS[(name, P)], rel=0.02)


@pytest.mark.parametrize("name", sorted(STATIC_MACS))
def test_static_network_macs_match_spec(name):
    """count_static_macs (the static baselines' cost in training and calibration reports) of the
    timm network at the variant's full image size."""
    timm = pytest.importorskip("timm")
    from gfnet_edge.models import count_static_macs

    net = timm.create_model(name, pretrained=False).eval()
    assert count_static_macs(net, VARIANTS[name].image_size) / 1e6 == pytest.approx(STATIC_MACS[name], rel=0.02)


def test_policy_and_classifier_macs_match_spec():
    costs = count_step_macs(GFNet(released_spec("resnet50", 96)))  # noqa: the big linear policy
    assert costs.policy / 1e6 == pytest.approx(46, rel=0.02)  # docs/gfnet.md: ~46M, first Linear dominates
    assert all(6e6 <= c <= 11e6 for c in costs.classifier)  # docs/gfnet.md: GRU classifier 6-10M
    assert costs.cumulative[0] == costs.backbone + costs.classifier[0]
    assert costs.cumulative[1] - costs.cumulative[0] == costs.backbone + costs.policy + costs.classifier[1]


def test_step_macs_run_the_focus_encoder_once(monkeypatch):
    """count_step_macs counts the encoder's multiply-adds on one pass and feeds that pass's
    features to the heads (not a counted pass and a second one for the heads); the figures are
    the demo model's of docs/checkpoints.md."""
    from conftest import DEMO_CHECKPOINT

    from gfnet_edge.models import load_checkpoint
    from gfnet_edge.models.backbones import Encoder

    model = load_checkpoint(DEMO_CHECKPOINT)
    passes = []
    forward = Encoder.forward
    monkeypatch.setattr(Encoder, "forward", lambda self, x: (passes.append(tuple(x.shape)), forward(self, x))[1])
    costs = count_step_macs(model)
    assert passes == [(1, 3, 96, 96)]
    assert round(costs.backbone / 1e5) == 457 and round(costs.policy / 1e5) == 5  # 45.7M, 0.5M
    assert [round(c / 1e2) for c in costs.classifier] == [13, 26, 38]  # 1.3K, 2.6K, 3.8K
    assert [round(c / 1e5) for c in costs.cumulative] == [457, 919, 1382]  # 45.7M, 91.9M, 138.2M


def test_glance_matches_interpolate_align_corners():
    x = torch.randn(2, 3, 224, 224)
    for mode in ("bilinear", "bicubic"):
        torch.testing.assert_close(glance_input(x, 96, mode), F.interpolate(x, size=(96, 96), mode=mode, align_corners=True))
    # align_corners=True keeps the corner pixels exactly
    g = glance_input(x, 96, "bilinear")
    torch.testing.assert_close(g[..., 0, 0], x[..., 0, 0])
    torch.testing.assert_close(g[..., -1, -1], x[..., -1, -1])


def test_crop_semantics_against_slicing():
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).view(2, 3, 10, 10)
    coords = torch.tensor([[0, 6], [3, 1]], dtype=torch.int32)
    out = crop_patches(x, coords, 4)
    assert torch.equal(out[0], x[0, :, 0:4, 6:10]) and torch.equal(out[1], x[1, :, 3:7, 1:5])
    with pytest.raises(ValueError, match="out of range"):
        crop_patches(x, torch.tensor([[0, 7], [0, 0]]), 4)
    with pytest.raises(ValueError, match="out of range"):
        crop_patches(x, torch.tensor([[-1, 0], [0, 0]]), 4)


def test_action_to_coords_is_float32_floor():
    a = torch.tensor([[0.0, 1.0], [0.5, 0.999999]], dtype=torch.float32)
    c = action_to_coords(a, 224, 96)
    assert c.tolist() == [[0, 128], [64, 127]]


def test_coords_override_and_input_checks():
    model = GFNet(released_spec("mobilenetv3_large_100", 96))
    x = torch.randn(3, 3, 224, 224)
    override = torch.tensor([[[0, 0], [10, 20], [128, 128]], [[5, 5], [6, 6], [7, 7]]], dtype=torch.int32)
    tr = model.trace(x, coords_override=override)
    assert torch.equal(tr.coords, override)
    for bad_coords, why in ((override + 1, "out of range"), (-override - 1, "out of range"),
                            (override[:1], r"must be \(2, 3, 2\)")):
        with pytest.raises(ValueError, match=why):
            model.trace(x, coords_override=bad_coords)
    with pytest.raises(ValueError, match=r"\(N, 3, 224, 224\)"):
        model.trace(torch.randn(1, 3, 200, 200))
    with pytest.raises(ValueError, match="NaN"):
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        model.trace(bad)
    with pytest.raises(TypeError, match="float32"):
        model.trace(x.double())


@pytest.mark.parametrize("classifier,step0", [("gru", "classifier"), ("cascaded", "backbone"), ("gru", "backbone")])
def test_custom_timm_backbone(classifier, step0):
    spec = GFNetSpec(
        model_name="demo-resnet", family="custom", backbone="resnet18",
        backbone_kwargs={"channels": (16, 32, 64, 128)}, image_size=128, patch_size=64, steps=3,
        num_classes=7, classifier=classifier, fc_hidden=32, step0=step0, policy_hidden=16,
    )
    model = _spread(GFNet(spec))
    assert model.spec.feature_dim == 128 and model.spec.fmap_channels == 128
    x = torch.randn(2, 3, 128, 128)
    tr = model.trace(x)
    ref_probs, ref_coords = reference_trace(model, x)
    torch.testing.assert_close(tr.probs, ref_probs, rtol=0, atol=1e-6)
    assert torch.equal(tr.coords, ref_coords)


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown GFNet variant"):
        released_spec("resnet18")
    with pytest.raises(ValueError, match="timm has no model"):
        GFNet(GFNetSpec(model_name="x", family="custom", backbone="no_such_net", image_size=64, patch_size=32, steps=2))
    with pytest.raises(ValueError, match="cascaded"):
        GFNetSpec(model_name="x", family="custom", backbone="resnet18", image_size=64, patch_size=32, steps=2,
                  classifier="cascaded", step0="classifier").validate()

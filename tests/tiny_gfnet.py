"""Tiny random-weight GFNets and their FP32 bundles, for tests that need a model of a given shape
(a cascaded classifier on a narrow ResNet-18, step 0 from the glance backbone)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple


def random_gfnet(name: str, image_size: int, patch_size: int, steps: int, num_classes: int,
                 channels: Sequence[int], policy_hidden: int, logit_scale: float = 20.0, random_bn: bool = False):
    """A seeded random-weight GFNet in eval mode; Linear weights are scaled by ``logit_scale`` to
    spread the logits, so that confidences (and exit steps) vary between images. ``random_bn``:
    realistic BatchNorm statistics instead of the zero-initialised last BN of each block (whose
    folded convolutions would be all zeros)."""
    import torch

    from gfnet_edge.models import GFNet
    from gfnet_edge.variants import GFNetSpec

    torch.manual_seed(0)
    spec = GFNetSpec(model_name=name, family="custom", backbone="resnet18",
                     backbone_kwargs={"channels": tuple(channels), "stem_width": 8}, image_size=image_size,
                     patch_size=patch_size, steps=steps, num_classes=num_classes, classifier="cascaded",
                     fc_hidden=None, step0="backbone", policy_conv=True, policy_hidden=policy_hidden)
    model = GFNet(spec).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and random_bn:
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(logit_scale)
    return model


def fp32_bundle(model, root: Path) -> Tuple[Path, Path]:
    """Saves ``model`` as ``root/tiny.pth.tar`` and builds ``root/bundle`` (FP32, ONNX Runtime);
    returns (checkpoint, bundle directory)."""
    from gfnet_edge.build import BuildConfig, build_bundle
    from gfnet_edge.models import save_checkpoint

    ckpt = Path(save_checkpoint(root / "tiny.pth.tar", model))
    bundle = build_bundle(ckpt, root / "bundle", BuildConfig(precision="fp32", backend="onnxruntime"), progress=False)
    return ckpt, bundle.root

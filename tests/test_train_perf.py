"""The trainer's work savings change nothing that is trained: the batch stream continued across
epochs (replayed only on resume) and the frozen glance encoder's outputs kept per image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from gfnet_edge.train import data as train_data  # noqa: E402
from gfnet_edge.train.config import tiny_config  # noqa: E402
from gfnet_edge.train.data import Batches, EpochBatches, load_split  # noqa: E402
from gfnet_edge.train.folder_data import FolderSplit, folder_source  # noqa: E402
from gfnet_edge.train.folder_stages.glance_cache import GlanceCache  # noqa: E402
from gfnet_edge.train.recipe import StagePlan  # noqa: E402
from gfnet_edge.train.stages import Run  # noqa: E402


def _reference_epochs(n, batches, iters, seed, epochs):
    """Every epoch's global batches from one uninterrupted :class:`Batches` stream."""
    stream = Batches(n, min(batches[0], n), seed)
    out = []
    for e in range(epochs):
        stream.batch = min(batches[min(e, len(batches) - 1)], n)
        out.append([stream.next().tolist() for _ in range(iters)])
    return out


def test_epoch_batches_continue_the_stream_and_a_resume_replays_it(monkeypatch):
    n, batches, iters, seed, world = 11, [4, 6], 3, 7, 2
    ref = _reference_epochs(n, batches, iters, seed, 5)
    calls = {"n": 0}
    real = Batches.next

    def counted(self):
        calls["n"] += 1
        return real(self)

    monkeypatch.setattr(train_data.Batches, "next", counted)
    runs = {r: EpochBatches(n, batches, iters, seed, rank=r, world=world) for r in range(world)}
    for e in range(5):
        for r, s in runs.items():
            calls["n"] = 0
            s.set_epoch(e)
            got = list(s)
            assert got == [b[r::world] for b in ref[e]], (e, r)
            assert calls["n"] == iters  # the stream goes on: no replay of earlier epochs
    # a fresh sampler (a resumed process) starting at epoch 3 replays the stream once, then continues
    resumed = EpochBatches(n, batches, iters, seed, rank=1, world=world)
    calls["n"] = 0
    resumed.set_epoch(3)
    assert list(resumed) == [b[1::world] for b in ref[3]]
    assert calls["n"] == 4 * iters
    calls["n"] = 0
    resumed.set_epoch(4)
    assert list(resumed) == [b[1::world] for b in ref[4]] and calls["n"] == iters
    # an epoch stopped after its first batch (a time cap) still leaves the stream at the next epoch
    capped = EpochBatches(n, batches, iters, seed)
    capped.set_epoch(0)
    next(iter(capped))
    capped.set_epoch(1)
    assert list(capped) == ref[1]
    capped.set_epoch(1)  # the same epoch again: replayed, not continued
    assert list(capped) == ref[1]


class _Encoder(torch.nn.Module):
    """A glance encoder stand-in: ``(pooled (n, 4), feature map (n, 4, 2, 2))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)

    def forward(self, x):
        fmap = self.conv(x)
        return fmap.mean((2, 3)), fmap


def test_glance_cache_returns_what_the_encoder_computes_once_per_image():
    torch.manual_seed(0)
    enc = _Encoder().eval()
    images = torch.randn(6, 3, 8, 8)
    lines = []
    cache = GlanceCache(enc, lambda x: x, 6, 1.0, lines.append, "ppo")
    with torch.no_grad():
        want = enc(images)
        for idx in ([0, 1, 2], [3, 1, 4], [2, 0, 5], [5, 4, 3]):
            i = torch.tensor(idx)
            f0, fmap = cache(images[i], i)
            assert torch.allclose(f0, want[0][i], atol=1e-6) and torch.allclose(fmap, want[1][i], atol=1e-6)
    assert cache.computed == 9 and lines == []  # the three batches holding a new image, whole
    # too small a limit, or data that changes per epoch: recomputed every time, one log line
    small = GlanceCache(enc, lambda x: x, 6, 20 * 6 * 4 / 2 ** 20 - 1e-9, lines.append, "bc")
    aug = GlanceCache(enc, lambda x: x, 6, 1.0, lines.append, "stage1", off="the train images are augmented")
    with torch.no_grad():
        for _ in range(2):
            for c in (small, aug):
                f0, _ = c(images[:3], torch.arange(3))
                assert torch.allclose(f0, want[0][:3], atol=1e-6)
    assert small.computed == aug.computed == 6
    assert len(lines) == 2 and "needs 0.0 MB > glance_cache_mb" in lines[0] and "augmented" in lines[1]
    # the next stage sharing a cache is told too, once
    aug.name = "stage3"
    with torch.no_grad():
        for _ in range(2):
            aug(images[:3], torch.arange(3))
    assert len(lines) == 3 and lines[2].startswith("[stage3]") and "augmented" in lines[2]


def test_glance_cache_is_shared_while_the_encoder_and_context_are_unchanged():
    """Stages share one cache: an unchanged encoder reuses the rows, a trained one (in-place
    update, as an optimiser makes), another mode or an autocast context recompute them."""
    torch.manual_seed(0)
    enc = _Encoder().eval()
    images = torch.randn(4, 3, 8, 8)
    idx = torch.arange(4)
    cache = GlanceCache(enc, lambda x: x, 4, 1.0, lambda line: None, "bc")
    with torch.no_grad():
        cache(images, idx)
        cache.name = "ppo"  # the next stage, encoder untouched: no encoder run
        f0, _ = cache(images, idx)
        assert cache.computed == 4 and torch.allclose(f0, enc(images)[0], atol=1e-6)
        enc.conv.bias.add_(1.0)  # trained in between
        f0, _ = cache(images, idx)
        assert cache.computed == 8 and torch.allclose(f0, enc(images)[0], atol=1e-6)
        cache(images, idx)
        assert cache.computed == 8
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f0, _ = cache(images, idx)
            assert cache.computed == 12 and f0.dtype == enc(images)[0].dtype
        enc.train()
        cache(images, idx)
        assert cache.computed == 16


def test_image_folder_data_is_cached_only_without_augmentation(tmp_path):
    split = FolderSplit(tmp_path, ["a", "b"], [])
    class _Spec:
        image_size, crop_pct, dataset_interpolation = 32, 1.0, "bilinear"

    for crop, flip, want in ((True, False, True), (False, True, True), (False, False, False)):
        src = folder_source(split, split, _Spec, 0, random_crop=crop, hflip=flip)
        assert src.train.augmented is want and src.val.augmented is False


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:  # the generated data go to this module's own cache
        mp.setenv("GFNET_EDGE_CACHE", str(d))
        torch.set_num_threads(1)
        try:
            yield d
        finally:
            torch.set_num_threads(threads)


def _frozen_glance_stages(out: Path, cache_mb: float):
    """stage1, bc, ppo and stage3 of a tiny demo run (glance frozen), 2 epochs of 3 batches of 4
    out of 8 images each; returns the weights and the images the glance encoder ran on."""
    plan = lambda lr: StagePlan(epochs=2, iters=3, batch=4, lr=lr)  # noqa: E731 (no time cap: lr by iteration)
    cfg = tiny_config(train_size=8, stage1=plan(1e-3), bc=plan(1e-3), ppo=plan(3e-4), stage3=plan(1e-3),
                      glance_cache_mb=cache_mb, eval_max=4)
    train = load_split("train", cfg.train_size, config=cfg.data(), progress=False)
    val = load_split("val", cfg.val_size, config=cfg.data(), progress=False)
    run = Run(out, cfg, train, val, progress=False, log=lambda s: None)
    seen = {"n": 0}

    def count(module, inputs, output):
        seen["n"] += len(inputs[0])

    run.model.model_prime.register_forward_hook(count)
    for stage in ("stage1", "bc", "ppo", "stage3"):
        getattr(run, stage)(resume=False)
    return {k: v.clone() for k, v in run.model.state_dict().items()}, seen["n"]


def test_frozen_glance_stages_train_the_same_weights_with_the_cache(tmp_path, cache_dir):
    with_cache, ran_cached = _frozen_glance_stages(tmp_path / "on", 1024.0)
    without, ran_plain = _frozen_glance_stages(tmp_path / "off", 0.0)
    for k, v in without.items():
        assert torch.allclose(with_cache[k].float(), v.float(), rtol=1e-5, atol=1e-6), k
    # the encoder ran once per image for the four stages together (it is frozen in each) instead
    # of once per drawn image (+ validation, the same in both runs)
    assert ran_plain - ran_cached == 4 * 2 * 3 * 4 - 8
    assert np.isfinite([v.float().sum().item() for v in with_cache.values()]).all()


def test_a_stage_that_trains_the_glance_encoder_frees_the_kept_outputs(tmp_path, cache_dir):
    cfg = tiny_config(train_size=8, eval_max=4)
    train = load_split("train", cfg.train_size, config=cfg.data(), progress=False)
    val = load_split("val", cfg.val_size, config=cfg.data(), progress=False)
    run = Run(tmp_path, cfg, train, val, progress=False, log=lambda s: None)
    cache = run.glance_cache("bc")
    x = torch.from_numpy(train.frames[:4]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        cache(x, torch.arange(4))
    assert cache.f0 is not None and cache.have[:4].all()
    run._set_trainable(list(run.model.policy.parameters()))  # a policy stage: the rows stay
    assert cache.f0 is not None
    run._set_trainable(list(run.model.model_prime.parameters()))
    assert cache.f0 is None and cache.have is None and run.glance_cache("stage1") is cache
    with torch.no_grad():  # kept again by a frozen-glance stage, then the GFNet stages are over
        cache(x, torch.arange(4))
    assert cache.f0 is not None
    run.cfg.static.epochs = 0  # nothing to train: only what the shared stage does on entry
    super(Run, run).static_stage()
    assert cache.f0 is None and cache.have is None

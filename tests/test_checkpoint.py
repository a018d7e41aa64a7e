"""Checkpoint I/O: both formats, RegNet pycls names, fp16 storage, and clear errors."""
from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")

from gfnet_edge.models import CheckpointError, GFNet, load_checkpoint, save_checkpoint
from gfnet_edge.models.keymap import timm_to_pycls
from gfnet_edge.variants import released_spec


@pytest.fixture(scope="module")
def mnv3():
    torch.manual_seed(1)
    m = GFNet(released_spec("mobilenetv3_large_100", 96))
    with torch.no_grad():
        m.policy.actor[0].weight.mul_(50)
    return m


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(2)
    return torch.randn(2, 3, 224, 224)


def _same(a, b, x):
    ta, tb = a.trace(x), b.trace(x)
    torch.testing.assert_close(ta.probs, tb.probs, rtol=0, atol=1e-6)
    assert torch.equal(ta.coords, tb.coords)


def test_released_format_round_trip(tmp_path, mnv3, images):
    path = save_checkpoint(tmp_path / "m.pth.tar", mnv3, metadata={"anytime_classification": [1.0, 2.0, 3.0]})
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("module.") for k in raw["model_state_dict"])
    assert raw["model_name"] == "mobilenetv3_large_100" and raw["patch_size"] == 96
    assert len(raw["flops"]) == 3 and raw["flops"][0] < raw["flops"][1] < raw["flops"][2]
    back = load_checkpoint(path)
    assert back.meta["anytime_classification"] == [1.0, 2.0, 3.0]
    assert "dynamic_threshold" in back.meta["missing_metadata"]
    _same(mnv3, back, images)


def test_training_script_format_without_metadata(tmp_path, mnv3, images):
    ck = {
        "model_prime_state_dict": mnv3.model_prime.net.state_dict(),
        "model_state_dict": mnv3.model.net.state_dict(),
        "fc": mnv3.fc.state_dict(),
        "policy": mnv3.policy.state_dict(),
    }
    torch.save(ck, tmp_path / "train.pth.tar")
    back = load_checkpoint(tmp_path / "train.pth.tar")  # name and P inferred from the weights
    assert back.spec.model_name == "mobilenetv3_large_100" and back.spec.patch_size == 96
    assert {"model_name", "patch_size", "flops", "dynamic_threshold"} <= set(back.meta["missing_metadata"])
    _same(mnv3, back, images)


def test_fp16_storage_restores_float32(tmp_path, mnv3):
    path = save_checkpoint(tmp_path / "h.pth.tar", mnv3, half=True)
    raw = torch.load(path, weights_only=True)
    assert raw["fc"]["fc_2.weight"].dtype == torch.float16
    back = load_checkpoint(path)
    assert back.fc.fc_2.weight.dtype == torch.float32
    torch.testing.assert_close(back.fc.fc_2.weight, mnv3.fc.fc_2.weight.half().float())


@pytest.mark.slow
def test_regnet_pycls_names(tmp_path, images):
    torch.manual_seed(3)
    m = GFNet(released_spec("regnety_600m", 96))
    path = save_checkpoint(tmp_path / "r.pth.tar", m)
    raw = torch.load(path, weights_only=True)
    keys = set(raw["model_state_dict"])
    assert "module.s1.b1.f.a.weight" in keys and "module.s1.b1.proj.weight" in keys
    assert "module.s1.b1.f.se.f_ex.0.weight" in keys and "module.fc.weight" in keys
    back = load_checkpoint(path)
    _same(m, back, images)
    # the mapping is a bijection on every key
    sd = m.model.net.state_dict()
    assert len(timm_to_pycls(sd)) == len(sd)


def _write_ckpt(path, mnv3, **override):
    ck = {
        "model_name": "mobilenetv3_large_100", "patch_size": 96,
        "model_prime_state_dict": mnv3.model_prime.net.state_dict(),
        "model_state_dict": mnv3.model.net.state_dict(),
        "fc": mnv3.fc.state_dict(), "policy": mnv3.policy.state_dict(),
    }
    for k, v in override.items():
        if v is None:
            ck.pop(k)
        else:
            ck[k] = v
    torch.save(ck, path)
    return path


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_file", "not found"),
        ("empty", "empty"),
        ("garbage", "not a readable torch checkpoint"),
        ("truncated", "not a readable torch checkpoint"),
        ("pickle_object", "refuses to unpickle|not a readable"),
        ("not_dict", "expected a dict"),
        ("missing_policy", "missing policy"),
        ("wrong_name", "not 'resnet50'"),
        ("unknown_name", "unknown model_name"),
        ("bad_shapes", "does not fit"),
        ("extra_keys", "unexpected keys"),
        ("missing_keys", "missing keys"),
    ],
)
def test_bad_checkpoints(tmp_path, mnv3, case, match):
    p = tmp_path / "bad.pth.tar"
    kw = {}
    if case == "missing_file":
        p = tmp_path / "nope.pth.tar"
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "garbage":
        p.write_bytes(b"this is not a checkpoint at all" * 10)
    elif case == "truncated":
        _write_ckpt(p, mnv3)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif case == "pickle_object":
        torch.save({"x": Evil()}, p, _use_new_zipfile_serialization=True, pickle_protocol=2)
    elif case == "not_dict":
        torch.save([1, 2, 3], p)
    elif case == "missing_policy":
        _write_ckpt(p, mnv3, policy=None)
    elif case == "wrong_name":
        _write_ckpt(p, mnv3)
        kw = {"model_name": "resnet50"}
    elif case == "unknown_name":
        _write_ckpt(p, mnv3, model_name="resnet9000")
    elif case == "bad_shapes":
        _write_ckpt(p, mnv3, model_name="efficientnet_b2", patch_size=128)
    elif case == "extra_keys":
        fc = dict(mnv3.fc.state_dict())
        fc["bogus.weight"] = torch.zeros(1)
        _write_ckpt(p, mnv3, fc=fc)
    elif case == "missing_keys":
        pol = dict(mnv3.policy.state_dict())
        pol.pop("actor.0.weight")
        _write_ckpt(p, mnv3, policy=pol)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(p, **kw)


@pytest.mark.parametrize("encoder", [
    {"conv_head.weight": torch.zeros(1024, 288, 1, 1)},                            # a MobileNet-V3 of no released width
    {"conv_head.weight": torch.zeros(1280, 320, 1, 1), "bn2.weight": torch.zeros(1280)},  # EfficientNet-B0
    {"features.denseblock3.denselayer1.conv1.weight": torch.zeros(1)},              # a DenseNet of 1 layer per block
    {"s4.b1.f.a.weight": torch.zeros(1), "head.fc.weight": torch.zeros(1000, 440)},  # a RegNetY of another width
], ids=["mobilenet", "efficientnet", "densenet", "regnet"])
def test_weights_of_a_known_family_but_no_released_variant_ask_for_the_name(tmp_path, encoder):
    """No name in the file and none given: weights whose family is known but whose sizes match no
    released variant get the same message as any other unknown weights (pass model_name), not an
    'unknown model_name' the user never gave."""
    p = tmp_path / "noname.pth.tar"
    torch.save({"model_prime_state_dict": encoder, "model_state_dict": encoder, "fc": {}, "policy": {}}, p)
    with pytest.raises(CheckpointError, match="cannot tell the model variant from the weights; pass model_name"):
        load_checkpoint(p)


@pytest.mark.parametrize("raised", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_a_checkpoint_write_stopped_by_a_signal_or_a_full_disk_raises_that_and_leaves_nothing(tmp_path, monkeypatch,
                                                                                            raised):
    """torch.save words any exception of its file's writes as 'RuntimeError: ... unexpected pos';
    atomic_torch_save raises the exception itself (a Ctrl-C's KeyboardInterrupt from the signal
    handler, a full disk's OSError), leaves no temporary file, and an earlier file whole."""
    import torch

    from gfnet_edge.models import checkpoint

    path = tmp_path / "stage1.pt"
    checkpoint.atomic_torch_save({"epoch": 1}, path)
    recorder = checkpoint._WriteRecorder

    class Failing:  # the checkpoint's file, whose third write is interrupted
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise raised
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    monkeypatch.setattr(checkpoint, "_WriteRecorder", lambda f, name: recorder(Failing(f), name))
    with pytest.raises(type(raised)) as info:
        checkpoint.atomic_torch_save({"epoch": 2, "w": torch.zeros(100000)}, path)
    assert info.value is raised
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1.pt"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def _count_builds(monkeypatch):
    """Counts the GFNets built, and the encoder passes run, on real (not meta) tensors."""
    from gfnet_edge.models import backbones, gfnet

    calls = {"built": 0, "probed": 0}
    init, probe = GFNet.__init__, backbones.probe_encoder

    def counted_init(self, spec):
        calls["built"] += torch.empty(0).device.type != "meta"
        init(self, spec)

    def counted_probe(encoder, patch_size):
        calls["probed"] += next(encoder.parameters()).device.type != "meta"
        return probe(encoder, patch_size)

    monkeypatch.setattr(GFNet, "__init__", counted_init)
    monkeypatch.setattr(gfnet, "probe_encoder", counted_probe)
    return calls


def test_loading_builds_no_model_with_random_weights(tmp_path, mnv3, images, monkeypatch):
    """The model is shaped once on the meta device and its storage filled from the file: no
    GFNet is built (randomly initialised, its encoder probed) only to be overwritten; the model
    loaded is the one saved."""
    path = save_checkpoint(tmp_path / "m.pth.tar", mnv3)
    calls = _count_builds(monkeypatch)
    loaded = load_checkpoint(path)
    assert calls == {"built": 0, "probed": 0}
    assert not loaded.training and loaded.spec == mnv3.spec
    for (k, a), (k2, b) in zip(mnv3.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.device == b.device and torch.equal(a, b), k
    _same(mnv3, loaded, images)


def test_a_model_with_state_a_state_dict_leaves_out_is_built_by_its_constructor(tmp_path, mnv3, images, monkeypatch):
    """A backbone holding a non-persistent buffer (its value set only by its constructor) is built
    for real before the file's weights are loaded into it."""
    from gfnet_edge.models import checkpoint

    path = save_checkpoint(tmp_path / "m.pth.tar", mnv3)
    real = checkpoint._holds_unsaved_state
    with torch.device("meta"):
        assert not real(GFNet(mnv3.spec))
        probe = GFNet(mnv3.spec)
    probe.model.register_buffer("table", torch.zeros(3), persistent=False)
    assert real(probe)
    monkeypatch.setattr(checkpoint, "_holds_unsaved_state", lambda m: True)
    calls = _count_builds(monkeypatch)
    loaded = load_checkpoint(path)
    assert calls == {"built": 1, "probed": 1}
    _same(mnv3, loaded, images)


def test_finite_check_clears_finite_tensors_without_a_mask_and_names_the_bad_one(monkeypatch):
    """check_finite looks at every tensor: NaN and infinities are refused, naming the tensor and
    how many values; finite tensors, one whose sum overflows included, pass, and finite ones are
    cleared without an element-wise mask (a pass over each tensor's values, not two)."""
    from gfnet_edge.models.checkpoint import check_finite

    huge = torch.full((4,), 3e38)  # finite values whose float32 sum is infinite
    assert not torch.isfinite(huge.sum())
    finite = {"a": torch.randn(64, 64), "b": torch.arange(5), "c": huge, "d": torch.randn(3).half()}
    masks = []
    isfinite = torch.isfinite

    def counted(t):
        masks.append(t.numel())
        return isfinite(t)

    monkeypatch.setattr(torch, "isfinite", counted)
    check_finite(finite, "x")
    assert [n for n in masks if n > 1] == [huge.numel()]  # only the overflowing tensor, value by value
    monkeypatch.undo()
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(8, 8)
        t[3, 4] = t[5, 6] = bad
        with pytest.raises(CheckpointError, match=r"^x: tensor 'w' holds 2 NaN or infinite value\(s\)"):
            check_finite({"ok": torch.ones(3), "w": t}, "x")
    t = torch.ones(4)
    t[0], t[1] = float("inf"), -float("inf")  # a sum of NaN
    with pytest.raises(CheckpointError, match="tensor 'w' holds 2 NaN"):
        check_finite({"w": t}, "x")


def test_loading_takes_the_files_tensors_without_copying_them_and_keeps_shared_ones_apart(tmp_path, mnv3,
                                                                                         monkeypatch):
    """The model's tensors are the ones read from the file, not copies of them; a file whose two
    encoders hold the same tensors (torch.save keeps one storage for both) still gives two
    encoders that share no memory."""
    ck = torch.load(save_checkpoint(tmp_path / "m.pth.tar", mnv3), weights_only=True)
    ck["model_state_dict"] = ck["model_prime_state_dict"]
    torch.save(ck, tmp_path / "shared.pth.tar")
    copies = []
    copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *a, **k: (copies.append(self.device.type != "meta"),
                                                                      copy(self, *a, **k))[1])
    loaded = load_checkpoint(tmp_path / "shared.pth.tar")
    monkeypatch.undo()
    assert not any(copies)  # (the initialisation on the meta device, while the model is shaped, writes nothing)
    tensors = [t for t in loaded.state_dict().values() if t.numel()]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    glance, focus = loaded.model_prime.net.state_dict(), loaded.model.net.state_dict()
    assert all(torch.equal(glance[k], focus[k]) for k in glance)
    expected = mnv3.model_prime.net.state_dict()
    assert all(torch.equal(glance[k], expected[k]) for k in glance)
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1.0)
    assert all(torch.equal(loaded.model_prime.net.state_dict()[k], expected[k]) for k in expected)

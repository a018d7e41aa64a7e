"""Kernel cases for the cross-architecture parity check (``tools/aarch64_parity.py``).

Each case makes its inputs from a fixed seed and computes its reference with torch /
torchvision (``make``: x86 only), and runs the extension on those inputs (``run``: numpy and
``gfnet_edge.ops`` only, so it runs on the device side without torch). The references are the
ones ``tests/test_kernels.py`` uses, with the same tolerances.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np

Arrays = Dict[str, np.ndarray]


@dataclass(frozen=True)
class Tolerance:
    """``|ours - ref| <= atol + rtol * |ref|`` elementwise; both zero means bit-identical."""

    atol: float = 0.0
    rtol: float = 0.0

    @property
    def exact(self) -> bool:
        return self.atol == 0.0 and self.rtol == 0.0


EXACT = Tolerance()


@dataclass(frozen=True)
class KernelCase:
    """One kernel call: ``make(rng) -> (inputs, torch reference)``, ``run(inputs) -> outputs``;
    ``tolerance`` maps each output to its tolerance against the reference."""

    name: str
    make: Callable[[np.random.Generator], Tuple[Arrays, Arrays]]
    run: Callable[[Arrays], Arrays]
    tolerance: Dict[str, Tolerance]


def _torch():
    import torch
    import torchvision.transforms.v2.functional as tvf

    torch.set_num_threads(2)
    return torch, tvf


def _ops():
    from gfnet_edge import ops

    return ops


def _mode(tvf, interpolation: str):
    return {"bilinear": tvf.InterpolationMode.BILINEAR, "bicubic": tvf.InterpolationMode.BICUBIC}[interpolation]


def _torch_resize_crop(frame: np.ndarray, S: int, crop_pct: float, interpolation: str) -> np.ndarray:
    """torchvision's uint8 antialiased resize + centre crop, (3, S, S) uint8."""
    torch, tvf = _torch()
    t = tvf.resize(torch.from_numpy(frame).permute(2, 0, 1), [int(S / crop_pct)],
                   interpolation=_mode(tvf, interpolation), antialias=True)
    return tvf.center_crop(t, [S, S]).numpy()


def _torch_normalise(chw_u8: np.ndarray, mean, std) -> np.ndarray:
    torch, tvf = _torch()
    return tvf.normalize(torch.from_numpy(chw_u8).float() / 255, list(mean), list(std)).numpy()


def _torch_glance(images: np.ndarray, P: int, mode: str) -> np.ndarray:
    torch, _ = _torch()
    return torch.nn.functional.interpolate(torch.from_numpy(images), size=(P, P), mode=mode,
                                           align_corners=True).numpy()


def _numpy(*tensors) -> List[np.ndarray]:
    return [t.detach().numpy().copy() for t in tensors]


# --------------------------------------------------------------------- pre-processing ----
def _preprocess_case(h: int, w: int, interpolation: str) -> KernelCase:
    S, crop, P = 224, 0.875, 96

    def make(rng):
        ops = _ops()
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        images = _torch_normalise(_torch_resize_crop(frame, S, crop, interpolation), ops.IMAGENET_MEAN,
                                  ops.IMAGENET_STD)[None]
        return {"frame": frame}, {"images": images, "glance": _torch_glance(images, P, "bicubic")}

    def run(x):
        images, glance = _ops().preprocess(x["frame"], S, crop, interpolation, glance_size=P)
        return {"images": images, "glance": glance}

    return KernelCase(f"preprocess_{interpolation}_{h}x{w}", make, run,
                      {"images": EXACT, "glance": Tolerance(atol=1e-5)})


def _resize_crop_case(h: int, w: int, interpolation: str, crop: float) -> KernelCase:
    S = 96

    def make(rng):
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        return {"frame": frame}, {"frames": _torch_resize_crop(frame, S, crop, interpolation).transpose(1, 2, 0)[None]}

    def run(x):
        return {"frames": _ops().resize_crop(x["frame"], S, crop, interpolation)}

    return KernelCase(f"resize_crop_{interpolation}_{h}x{w}_{crop}", make, run, {"frames": EXACT})


def _glance_case(mode: str, S: int, P: int) -> KernelCase:
    def make(rng):
        images = rng.standard_normal((2, 3, S, S)).astype(np.float32)
        return {"images": images}, {"glance": _torch_glance(images, P, mode)}

    def run(x):
        return {"glance": _ops().glance(x["images"], P, mode)}

    return KernelCase(f"glance_{mode}_{S}to{P}", make, run, {"glance": Tolerance(atol=1e-5)})


def _glance_u8_case(mode: str, S: int, P: int) -> KernelCase:
    def make(rng):
        ops = _ops()
        frames = rng.integers(0, 256, (2, S, S, 3), dtype=np.uint8)
        norm = _torch_normalise(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)), ops.IMAGENET_MEAN, ops.IMAGENET_STD)
        return {"frames": frames}, {"glance": _torch_glance(norm, P, mode)}

    def run(x):
        ops = _ops()
        return {"glance": ops.glance(x["frames"], P, mode, mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD)}

    return KernelCase(f"glance_u8_{mode}_{S}to{P}", make, run, {"glance": Tolerance(atol=1e-5)})


def _crop_u8_case() -> KernelCase:
    mean, std, P = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4), 24
    coords = np.array([[0, 0], [40, 40], [13, 7], [40, 0]], np.int32)

    def make(rng):
        frames = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
        norm = _torch_normalise(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)), mean, std)
        ref = np.stack([norm[i, :, r:r + P, c:c + P] for i, (r, c) in enumerate(coords)])
        return {"frames": frames, "coords": coords}, {"patches": ref}

    def run(x):
        return {"patches": _ops().crop_patches(x["frames"], x["coords"], P, mean=mean, std=std)}

    return KernelCase("crop_patches_u8", make, run, {"patches": EXACT})


# ---------------------------------------------------------------------------- heads ----
def _gru_weights(torch, I: int, H: int, seed: int):
    torch.manual_seed(seed)
    cell = torch.nn.GRUCell(I, H)
    return cell, _numpy(cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)


_GRU_KEYS = ("w_ih", "w_hh", "b_ih", "b_hh")


def _gru_case(I: int, H: int, B: int) -> KernelCase:
    def make(rng):
        torch, _ = _torch()
        cell, w = _gru_weights(torch, I, H, 0)
        x = rng.standard_normal((B, I)).astype(np.float32)
        h = rng.standard_normal((B, H)).astype(np.float32)
        with torch.no_grad():
            ref = cell(torch.from_numpy(x), torch.from_numpy(h)).numpy()
            ref0 = cell(torch.from_numpy(x)).numpy()
        return {**dict(zip(_GRU_KEYS, w)), "x": x, "h": h}, {"h": ref, "h_from_zero": ref0, "h_float16": ref}

    def run(x):
        ops = _ops()
        w = [x[k] for k in _GRU_KEYS]
        cell = ops.GRUCell(*w)
        return {"h": cell.step(x["x"], x["h"]), "h_from_zero": cell.step(x["x"], None),
                "h_float16": ops.GRUCell(*w, weight_dtype="float16").step(x["x"], x["h"])}

    tol = Tolerance(atol=1e-5, rtol=1e-5)
    return KernelCase(f"gru_cell_{I}x{H}_batch{B}", make, run,
                      {"h": tol, "h_from_zero": tol, "h_float16": Tolerance(atol=3e-3)})


def _gru_head_case(B: int) -> KernelCase:
    def make(rng):
        torch, _ = _torch()
        cell, w = _gru_weights(torch, 96, 48, 0)
        fc = torch.nn.Linear(48, 10)
        x = rng.standard_normal((B, 96)).astype(np.float32)
        h = rng.standard_normal((B, 48)).astype(np.float32)
        with torch.no_grad():
            rh = cell(torch.from_numpy(x), torch.from_numpy(h))
            rl = fc(rh)
            rp = torch.softmax(rl, 1)
        fw, fb = _numpy(fc.weight, fc.bias)
        inputs = {**dict(zip(_GRU_KEYS, w)), "fc_w": fw, "fc_b": fb, "x": x, "h": h}
        return inputs, {"h": rh.numpy(), "logits": rl.numpy(), "maxprob": rp.max(1).values.numpy(),
                        "argmax": rl.argmax(1).numpy().astype(np.int32)}

    def run(x):
        head = _ops().GRUHead(*(x[k] for k in _GRU_KEYS), x["fc_w"], x["fc_b"])
        h, logits, maxprob, argmax = head.step(x["x"], x["h"])
        return {"h": h, "logits": logits, "maxprob": maxprob, "argmax": argmax}

    tol = Tolerance(atol=1e-5, rtol=1e-5)
    return KernelCase(f"gru_classifier_head_batch{B}", make, run,
                      {"h": tol, "logits": tol, "maxprob": Tolerance(atol=1e-6, rtol=1e-5), "argmax": EXACT})


def _actor_case(S: int, P: int) -> KernelCase:
    def make(rng):
        torch, _ = _torch()
        cell, w = _gru_weights(torch, 256, 256, 0)
        actor = torch.nn.Linear(256, 2)
        with torch.no_grad():
            actor.weight.mul_(8)  # spread the actions over (0, 1)
        x = rng.standard_normal((32, 256)).astype(np.float32)
        with torch.no_grad():
            rh = cell(torch.from_numpy(x))
            ra = torch.sigmoid(actor(rh))
        aw, ab = _numpy(actor.weight, actor.bias)
        coords = np.floor(ra.numpy() * (S - P)).astype(np.int32)
        return ({**dict(zip(_GRU_KEYS, w)), "actor_w": aw, "actor_b": ab, "x": x},
                {"h": rh.numpy(), "action": ra.numpy(), "coords": coords})

    def run(x):
        head = _ops().ActorHead(*(x[k] for k in _GRU_KEYS), x["actor_w"], x["actor_b"])
        h, action, coords = head.step(x["x"], None, S, P)
        return {"h": h, "action": action, "coords": coords}

    # floor() of an action within float error of an integer may differ by one from torch's
    tol = {"h": Tolerance(atol=1e-5, rtol=1e-5), "action": Tolerance(atol=1e-6), "coords": Tolerance(atol=1)}
    return KernelCase(f"actor_head_{S}_{P}", make, run, tol)


def _cascaded_case(layout: str) -> KernelCase:
    T, N, Fd, C = 4, 6, 40, 11

    def make(rng):
        torch, _ = _torch()
        torch.manual_seed(2)
        fcs = {k: torch.nn.Linear(k * Fd, C) for k in range(2, T + 1)}
        feats = rng.standard_normal((N, T, Fd)).astype(np.float32)
        inputs: Arrays = {"feats": feats}
        ref: Arrays = {}
        for k in range(2, T + 1):
            inputs[f"w{k}"], inputs[f"b{k}"] = _numpy(fcs[k].weight, fcs[k].bias)
            with torch.no_grad():
                logits = fcs[k](torch.from_numpy(feats[:, :k].reshape(N, -1)))
            ref[f"logits{k}"] = logits.numpy()
            ref[f"maxprob{k}"] = torch.softmax(logits, 1).max(1).values.numpy()
            ref[f"argmax{k}"] = logits.argmax(1).numpy().astype(np.int32)
        return inputs, ref

    def run(x):
        head = _ops().CascadedHead([(x[f"w{k}"], x[f"b{k}"]) for k in range(2, T + 1)])
        feats = x["feats"] if layout == "ntf" else np.ascontiguousarray(x["feats"].transpose(1, 0, 2))
        out: Arrays = {}
        for k in range(2, T + 1):
            out[f"logits{k}"], out[f"maxprob{k}"], out[f"argmax{k}"] = head.step(feats, k, layout=layout)
        return out

    tol: Dict[str, Tolerance] = {}
    for k in range(2, T + 1):
        tol.update({f"logits{k}": Tolerance(atol=1e-5, rtol=1e-5), f"maxprob{k}": Tolerance(atol=1e-6, rtol=1e-5),
                    f"argmax{k}": EXACT})
    return KernelCase(f"cascaded_head_{layout}", make, run, tol)


def _linear_case() -> KernelCase:
    def make(rng):
        torch, _ = _torch()
        torch.manual_seed(3)
        lin = torch.nn.Linear(300, 70)
        x = rng.standard_normal((9, 300)).astype(np.float32)
        with torch.no_grad():
            ref = lin(torch.from_numpy(x))
        w, b = _numpy(lin.weight, lin.bias)
        y = ref.numpy()
        return {"w": w, "b": b, "x": x}, {"y": y, "y_relu": np.maximum(y, 0), "y_float16": y}

    def run(x):
        ops = _ops()
        return {"y": ops.Linear(x["w"], x["b"])(x["x"]), "y_relu": ops.linear(x["x"], x["w"], x["b"], relu=True),
                "y_float16": ops.Linear(x["w"], x["b"], weight_dtype="float16")(x["x"])}

    tol = Tolerance(atol=1e-5, rtol=1e-5)
    return KernelCase("linear_300to70", make, run, {"y": tol, "y_relu": tol, "y_float16": Tolerance(atol=2e-3)})


def _softmax_case() -> KernelCase:
    def make(rng):
        torch, _ = _torch()
        logits = rng.standard_normal((7, 1000)).astype(np.float32) * 5
        logits[3, 10] = logits[3, 20] = 100.0  # a tie: the first index wins
        t = torch.from_numpy(logits)
        return {"logits": logits}, {"maxprob": torch.softmax(t, 1).max(1).values.numpy(),
                                    "argmax": t.argmax(1).numpy().astype(np.int32)}

    def run(x):
        maxprob, argmax = _ops().softmax_stats(x["logits"])
        return {"maxprob": maxprob, "argmax": argmax}

    return KernelCase("softmax_stats", make, run, {"maxprob": Tolerance(rtol=1e-5), "argmax": EXACT})


def kernel_cases() -> List[KernelCase]:
    """Every case, in a fixed order (each has its own seed, so the order changes no input)."""
    cases = [_preprocess_case(h, w, i) for (h, w) in [(480, 640), (257, 311), (100, 150)]
             for i in ("bilinear", "bicubic")]
    cases += [_resize_crop_case(257, 311, i, c) for i in ("bilinear", "bicubic") for c in (0.875, 1.0)]
    cases += [_glance_case(m, S, P) for m in ("bilinear", "bicubic") for (S, P) in [(224, 96), (37, 13)]]
    cases += [_glance_u8_case(m, S, P) for m in ("bilinear", "bicubic") for (S, P) in [(224, 96), (17, 5)]]
    cases += [_crop_u8_case()]
    cases += [_gru_case(I, H, B) for (I, H, B) in [(512, 256, 3), (256, 256, 64), (37, 19, 5), (1, 1, 1)]]
    cases += [_gru_head_case(B) for B in (1, 4)]
    cases += [_actor_case(224, 96), _cascaded_case("ntf"), _cascaded_case("tnf"), _linear_case(), _softmax_case()]
    return cases

"""Quantization-aware fine-tuning of a graph's weights against its own FP32 outputs.

Post-training quantization rounds each weight to the nearest step and clips each activation
to its calibrated range; the errors add up through the network. Fine-tuning runs the Q/DQ graph
in torch with differentiable quantizers (:mod:`.torch_graph`: the Q/DQ placement and the
activation scales of the calibrated graph, weights re-quantized every step as ONNX Runtime
would) and adjusts the float weights and biases so that the quantized graph's outputs match
the FP32 graph's on the calibration inputs (distillation: no labels, the FP32 graph is the
teacher). The result is an FP32 graph with the adjusted weights; quantizing it with the same
calibration ranges gives the fine-tuned INT8 graph, and every later variant of the
mixed-precision search starts from it.

The loss is the mean over the graph's outputs of the squared error divided by the output's
variance over the calibration inputs (outputs of different scales weigh the same). Step sizes
are relative: a weight tensor moves by about ``lr`` of its quantization step per iteration
(Adam), a bias by ``lr`` of the step its values would have at 8 bits; the rate decays to 0
(cosine) over the run.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np

from .probe import outputs


@dataclass
class FinetuneResult:
    """What :func:`finetune_weights` did (for the quantization report).

    Attributes:
        epochs: passes over the calibration inputs.
        iterations: optimiser steps.
        inputs: calibration inputs used.
        loss_before, loss_after: the loss (see the module) of the quantized graph on the
            calibration inputs before and after.
        tensors: weight and bias tensors adjusted (0 when fine-tuning did not lower the loss:
            the FP32 weights are kept).
        seconds: wall time.
    """

    epochs: int
    iterations: int
    inputs: int
    loss_before: float
    loss_after: float
    tensors: int
    seconds: float

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block (None: left as it is), and
    set back to what it was after it, also when the block raises."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _loss(student, teacher, inv_var):
    return sum(((s - t) ** 2 * w).mean() for s, t, w in zip(student, teacher, inv_var)) / len(student)


def finetune_weights(qdq, fp32, x: np.ndarray, epochs: int, lr: float = 0.01, batch_size: int = 32,
                     flip: bool = True, derived: Optional[Callable[[Dict[str, Any]], List[Any]]] = None,
                     seed: int = 0, threads: Optional[int] = None, progress: bool = False,
                     desc: str = "fine-tuning"):
    """Fine-tunes the weights of ``fp32`` for its quantized form ``qdq`` (see the module).

    Args:
        qdq: the calibrated Q/DQ ``ModelProto`` (placement and activation scales used as they are).
        fp32: the FP32 ``ModelProto`` it was quantized from (not modified).
        x: calibration inputs (N, ...) float32 of the graph's one input.
        epochs: passes over ``x``.
        lr: step size, in quantization steps per iteration.
        batch_size: inputs per step.
        flip: also train on the inputs mirrored left-right (an epoch draws ``len(x)`` inputs
            from both); the FP32 graph's outputs on them are their targets, so this holds for
            any task, whether or not mirroring keeps the label.
        derived: more targets computed from the graph's outputs (name -> tensor), e.g. what a
            head downstream makes of them; each counts in the loss like an output.
        seed: order of the inputs.
        threads: torch / ONNX Runtime threads (``None``: their defaults); torch's thread count
            is set back to what it was on return.
        progress: a progress bar.
        desc: the progress bar's label.

    Returns:
        ``(fine-tuned FP32 ModelProto, FinetuneResult)``.

    Raises:
        UnsupportedGraph: an op type the torch interpreter does not run.
    """
    with torch_threads(threads):
        return _finetune(qdq, fp32, x, epochs, lr, batch_size, flip, derived, seed, threads, progress, desc)


def _finetune(qdq, fp32, x, epochs, lr, batch_size, flip, derived, seed, threads, progress, desc):
    """:func:`finetune_weights` with torch's threads set."""
    import onnx
    import torch
    from onnx import numpy_helper

    from .torch_graph import QdqGraphModule

    t0 = time.perf_counter()
    module = QdqGraphModule(qdq, fp32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if flip:  # the mirrored inputs as more examples (their own FP32 outputs as targets)
        x = np.concatenate([x, np.ascontiguousarray(x[..., ::-1])])
    names = list(module.output_names)
    out32 = outputs(fp32, x, max(batch_size, 64), threads)
    teacher = [torch.from_numpy(out32[k]) for k in names]

    def targets(outs):
        return list(outs) + (list(derived(dict(zip(names, outs)))) if derived is not None else [])

    with torch.no_grad():
        teacher = targets(teacher)
    student = lambda z: targets(module(z))  # noqa: E731
    inv_var = [1.0 / (t[:n].var(dim=0, unbiased=False).mean() + 1e-12) for t in teacher]
    xs = torch.from_numpy(x)

    def evaluate() -> float:
        with torch.no_grad():  # on the inputs as given (not mirrored)
            total = 0.0
            for i in range(0, n, 64):
                j = min(i + 64, n)
                out = student(xs[i:j])
                total += float(_loss(out, [t[i:j] for t in teacher], inv_var)) * (j - i)
        return total / n

    groups = []
    for key, p in module.weights.items():  # the step of the graph's own weight grid
        step = float(p.detach().abs().max()) / module.weight_qmax[key]
        groups.append({"params": [p], "lr": lr * max(step, 1e-8)})
    for p in module.biases.values():
        step = float(p.detach().abs().max()) / 127.0
        groups.append({"params": [p], "lr": lr * max(step, 1e-8)})
    before = evaluate()
    per_epoch = max(1, n // batch_size)
    total = max(1, int(epochs)) * per_epoch
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    rng = np.random.default_rng(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="it", leave=False)
    module.train()
    it = 0
    for _ in range(max(1, int(epochs))):
        order = torch.from_numpy(rng.permutation(len(xs))[:n])
        for b in range(per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            opt.zero_grad(set_to_none=True)
            loss = _loss(student(xs[idx]), [t[idx] for t in teacher], inv_var)
            loss.backward()
            opt.step()
            sched.step()
            it += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.4f}")
    if bar is not None:
        bar.close()
    after = evaluate()
    tuned = onnx.ModelProto()
    tuned.CopyFrom(fp32)
    done = 0
    if after < before:  # otherwise the FP32 weights stay (the result says so: tensors == 0)
        values = module.float_weights()
        for t in tuned.graph.initializer:
            if t.name in values and tuple(t.dims) == values[t.name].shape:
                t.CopyFrom(numpy_helper.from_array(values[t.name].astype(np.float32), t.name))
                done += 1
    return tuned, FinetuneResult(int(epochs), it, n, round(before, 6), round(after, 6), done,
                                 round(time.perf_counter() - t0, 1))


def finetune_file(qdq_path: Path, fp32_path: Path, out_path: Path, x: np.ndarray, epochs: int, **kwargs):
    """:func:`finetune_weights` on files: writes the fine-tuned FP32 graph to ``out_path``."""
    import onnx

    tuned, result = finetune_weights(onnx.load(str(qdq_path)), onnx.load(str(fp32_path)), x, epochs, **kwargs)
    onnx.save(tuned, str(out_path))
    return result


def first_patch_location(heads: Dict[str, np.ndarray]) -> Callable[[Dict[str, Any]], List[Any]]:
    """A ``derived`` target for the glance graph: the policy's first action (the first patch's
    location, in [0, 1]^2) computed from the graph's ``policy_state`` output with the bundle's
    policy head (GRU from a zero state, then the actor: Linear + sigmoid), as the runtime does.

    On GFNet the first patch's location is what the glance graph's rounding moves most: a patch
    cut a pixel away changes the next step's features more than the rounding of the features.
    """
    import torch

    w = {k: torch.from_numpy(np.asarray(heads[k], np.float32)) for k in
         ("pol.w_ih", "pol.w_hh", "pol.b_ih", "pol.b_hh", "pol.actor.w", "pol.actor.b")}
    cell = torch.nn.GRUCell(w["pol.w_ih"].shape[1], w["pol.w_hh"].shape[1])
    actor = torch.nn.Linear(w["pol.actor.w"].shape[1], w["pol.actor.w"].shape[0])
    with torch.no_grad():
        for p, k in ((cell.weight_ih, "pol.w_ih"), (cell.weight_hh, "pol.w_hh"), (cell.bias_ih, "pol.b_ih"),
                     (cell.bias_hh, "pol.b_hh"), (actor.weight, "pol.actor.w"), (actor.bias, "pol.actor.b")):
            p.copy_(w[k])
    cell.requires_grad_(False)  # fixed heads: gradients reach policy_state only
    actor.requires_grad_(False)

    def derive(outs: Dict[str, Any]) -> List[Any]:
        return [torch.sigmoid(actor(cell(outs["policy_state"])))]  # the GRU's state starts at zero

    return derive

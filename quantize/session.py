"""One quantization run's state: the pre-processed graphs, the quantized variants, scoring."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

import numpy as np

from gfnet_edge.model_desc import ModelDesc

from .calibration import QuantCalibrationSet
from .checker import TensorRTCompatError, check_tensorrt_compat
from .macs import int8_mac_share, node_macs
from .options import OrtSettings, QuantizeOptions, ort_settings
from .qdq import preprocess, quantize_graph
from .scoring import Traced, trace

#: The two backbone graphs of a GFNet bundle.
GRAPHS: Tuple[str, str] = ("glance", "focus")


class QuantSession:
    """Quantizes graph variants (cached by the set of nodes kept in float) and scores graph pairs.

    Calibration runs once per graph: ONNX Runtime's ranges are cached in ``work`` and reused by
    every later variant. Every variant written is checked against the profile's rules.
    """

    def __init__(self, desc: ModelDesc, fp32: Dict[str, Path], heads, calib: QuantCalibrationSet, work: Path,
                 opts: QuantizeOptions, progress: bool) -> None:
        self.desc, self.fp32, self.heads, self.calib = desc, fp32, heads, calib
        self.work, self.opts, self.progress = work, opts, progress
        self.profile = opts.spec
        self.method = opts.resolved_method
        self.settings = ort_settings(opts)
        #: fine-tuning epochs per graph (0: off; see :meth:`QuantizeOptions.finetune_for`)
        self.finetune_epochs = opts.finetune_for(calib.num_images)
        #: per graph, the FP32 graph variants are quantized from (after fine-tuning: the
        #: fine-tuned one); :attr:`reference` keeps the pre-processed FP32 graph
        self.pre: Dict[str, Path] = {}
        self.reference: Dict[str, Path] = {}
        self.finetuned: Dict[str, Dict[str, Any]] = {}
        self.pre_problems: Dict[str, Optional[str]] = {}
        self.variants: Dict[Tuple[str, FrozenSet[str]], Path] = {}
        self.info: Dict[Tuple[str, FrozenSet[str]], Dict[str, Any]] = {}
        self.checks: Dict[str, List[str]] = {}
        self.calib_seconds: Dict[str, float] = {}
        self._graph_settings: Dict[str, OrtSettings] = {}
        #: per graph, FP32 channel means of bias-corrected tensors (shared by the variants)
        self._bias_reference: Dict[str, Dict[str, np.ndarray]] = {}
        self._count = 0
        #: per graph, weighted nodes every variant keeps in float (the patch guard's choice)
        self.fixed: Dict[str, FrozenSet[str]] = {g: frozenset() for g in GRAPHS}
        #: the patch guard's choice and figures (:mod:`.patch_guard`), or why it did not run
        self.patch_guard: Optional[Dict[str, Any]] = None
        self._prepared: set = set()
        #: quantized files made for one purpose that another can take as they are, by
        #: (graph, source, nodes in float): the guard's all-INT8 glance when it keeps nothing
        self._spare: Dict[Tuple[str, Path, FrozenSet[str]], Tuple[Path, Dict[str, Any]]] = {}
        for g in GRAPHS:
            self.pre[g], self.pre_problems[g] = preprocess(Path(fp32[g]), work / f"{g}.pre.onnx")
            self.reference[g] = self.pre[g]
        import onnx

        #: per graph, multiply-adds per image of each weighted node; runs per image of each graph
        self.macs: Dict[str, Dict[str, int]] = {g: node_macs(onnx.load(str(self.pre[g]))) for g in GRAPHS}
        self.runs: Dict[str, int] = {"glance": 1, "focus": max(desc.steps - 1, 1)}

    def int8_mac_share(self, excluded: Mapping[str, FrozenSet[str]]) -> float:
        """Share of backbone multiply-adds per image in INT8 with ``excluded`` (and the nodes
        :attr:`fixed`) kept in float."""
        return int8_mac_share(self.macs, {g: self.key(g, excluded.get(g, frozenset()))[1] for g in GRAPHS}, self.runs)

    def key(self, graph: str, excluded: FrozenSet[str] = frozenset()) -> Tuple[str, FrozenSet[str]]:
        """The cache key of a variant: the nodes kept in float, :attr:`fixed` included."""
        return graph, frozenset(excluded) | self.fixed[graph]

    def quantized(self, graph: str, excluded: FrozenSet[str] = frozenset()) -> Path:
        """The ``graph`` quantized with the nodes ``excluded`` (and :attr:`fixed`) kept in float
        (cached). The first call per graph also chooses the patch guard's nodes (glance) and
        fine-tunes the weights, where the options ask for them."""
        self._prepare(graph)
        key = self.key(graph, excluded)
        if key in self.variants:
            return self.variants[key]
        path, self.info[key] = self._quantize(graph, self.pre[graph], key[1])
        if self.opts.bias_correction_inputs > 0:
            self.info[key]["bias_corrected"] = self._correct_biases(graph, path)
        violations = check_tensorrt_compat(path, self.profile)
        self.checks[path.name] = violations
        if violations:
            raise TensorRTCompatError(f"{graph} graph ({self.profile.name} profile, {path})", violations)
        self.variants[key] = path
        return path

    def _quantize(self, graph: str, src: Path, excluded: FrozenSet[str]) -> Tuple[Path, Dict[str, Any]]:
        """Quantizes ``src`` (a float ``graph``) into a new work file; the first call per graph
        calibrates (timed), later ones reuse the cached ranges. Returns (path, placement info)."""
        spare = self._spare.pop((graph, src, frozenset(excluded)), None)
        if spare is not None:
            return spare
        self._count += 1
        path = self.work / f"{graph}.int8.{self._count:03d}.onnx"
        cache = self.work / f"{graph}.calibration.json"
        first = not cache.is_file()
        reader = self.calib.reader(graph, self.opts.batch_size, progress=self.progress and first)
        t0 = time.perf_counter()
        info = quantize_graph(src, path, reader, self._settings(graph), self.method, self.profile,
                              sorted(excluded), cache)
        if first:
            self.calib_seconds[graph] = round(time.perf_counter() - t0, 2)
        return path, info

    def _prepare(self, graph: str) -> None:
        if graph in self._prepared:
            return
        self._prepared.add(graph)
        if graph == "glance" and self.opts.guard_share > 0:
            self._guard()
        if self.finetune_epochs > 0:
            self._finetune(graph)

    def _heads(self) -> Mapping[str, np.ndarray]:
        from gfnet_edge.runtime.heads import load_head_arrays

        return self.heads if isinstance(self.heads, Mapping) else load_head_arrays(Path(self.heads))

    def _guard(self) -> None:
        """Chooses the glance nodes kept in float to protect the first patch's location
        (:mod:`.patch_guard`), measured on the calibrated all-INT8 glance graph."""
        import onnx

        from . import patch_guard
        from .qdq import REMOVABLE_ACTIVATIONS

        heads = self._heads()
        ref = onnx.load(str(self.reference["glance"]))
        if "policy_state" not in {o.name for o in ref.graph.output} or "pol.actor.w" not in heads:
            self.patch_guard = {"skipped": "the glance graph has no policy_state output or the heads no policy"}
            return
        folded = sorted(set(self.settings.op_types_to_quantize) & set(REMOVABLE_ACTIVATIONS))
        if folded:  # ONNX Runtime folds those into the Q after them: no float activation to measure with
            self.patch_guard = {"skipped": f"the {self.profile.name} profile quantizes {', '.join(folded)} "
                                           "(folded into the quantizers): activations cannot be put back in float"}
            return
        base, base_info = self._quantize("glance", self.reference["glance"], frozenset())
        keep = False
        try:
            x = self.calib.inputs("glance")
            idx = np.unique(np.linspace(0, len(x) - 1, min(len(x), patch_guard.MEASURE_INPUTS)).round().astype(int))
            location = patch_guard.first_patch_pixels(heads, self.desc.image_size, self.desc.patch_size)
            probe = patch_guard.LocationProbe(ref, x[idx], location, self.opts.threads, self.opts.batch_size)
            qdq = onnx.load(str(base))
            cands, totals = patch_guard.measure(qdq, probe, self.macs["glance"], self.progress)
            # within the search's own limit too: the guard's nodes count against it
            limit = self.opts.float_mac_limit
            share = self.opts.guard_share if limit is None else min(self.opts.guard_share, limit)
            guard = patch_guard.choose(cands, totals, lambda nodes: 1.0 - self.int8_mac_share({"glance": nodes}),
                                       share)
            if guard.nodes:
                guard.rms_px["with_guard"] = round(float(np.sqrt(patch_guard.guarded_mse(qdq, probe, guard))), 4)
            keep = not guard.nodes  # then it is the graph fine-tuning or the first variant starts from
        finally:
            if keep:
                self._spare[("glance", self.reference["glance"], frozenset())] = (base, base_info)
            else:
                base.unlink(missing_ok=True)
        guard.inputs = len(idx)
        self.fixed["glance"] = guard.nodes
        self.patch_guard = guard.report()

    def _finetune(self, graph: str) -> None:
        """Quantizes ``graph`` (INT8 but for :attr:`fixed`, calibrating it), fine-tunes its
        weights for that quantization (:mod:`.finetune`) and makes the result the graph every
        variant is quantized from (with the same calibration ranges)."""
        from .finetune import finetune_file, first_patch_location
        from .torch_graph import UnsupportedGraph

        base, _ = self._quantize(graph, self.reference[graph], self.fixed[graph])
        tuned = self.work / f"{graph}.finetuned.onnx"
        derived = None
        if graph == "glance" and self.opts.finetune_policy:
            derived = first_patch_location(self._heads())
        try:
            result = finetune_file(base, self.reference[graph], tuned, self.calib.inputs(graph), self.finetune_epochs,
                                   lr=self.opts.finetune_lr, batch_size=self.opts.batch_size, seed=self.opts.seed,
                                   threads=self.opts.threads, progress=self.progress, desc=f"fine-tuning {graph}",
                                   derived=derived)
        except UnsupportedGraph as e:  # the graph stays as calibrated; the report says why
            self.finetuned[graph] = {"skipped": str(e)}
        else:
            self.finetuned[graph] = result.to_dict()
            self.pre[graph] = tuned
        finally:
            base.unlink(missing_ok=True)

    def _settings(self, graph: str) -> OrtSettings:
        """The profile's settings, plus min / max ranges for the tensors of the roles asked for
        (measured once per graph: every variant shares them)."""
        roles = self.opts.max_range_roles
        if not roles:
            return self.settings
        if graph in self._graph_settings:
            return self._graph_settings[graph]
        from .ranges import minmax_overrides

        extra = dict(self.settings.extra_options)
        overrides = dict(extra.get("TensorQuantOverrides") or {})
        overrides.update(minmax_overrides(self.reference[graph], roles, self.calib.inputs(graph),
                                          threads=self.opts.threads))
        extra["TensorQuantOverrides"] = overrides
        self._graph_settings[graph] = replace(self.settings, extra_options=extra)
        return self._graph_settings[graph]

    def _correct_biases(self, graph: str, path: Path) -> int:
        import onnx

        from .bias_correction import correct_biases

        q = onnx.load(str(path))
        x = self.calib.inputs(graph)
        idx = np.linspace(0, len(x) - 1, min(len(x), self.opts.bias_correction_inputs)).round().astype(int)
        done = correct_biases(q, onnx.load(str(self.reference[graph])), x[np.unique(idx)], self.opts.threads or 2,
                              reference=self._bias_reference.setdefault(graph, {}))
        onnx.save(q, str(path))
        return len(done)

    def discard(self, graph: str, excluded: FrozenSet[str]) -> None:
        """Deletes a variant no longer needed (the base one, :attr:`fixed` in float, is kept);
        saves disk on big models."""
        key = self.key(graph, excluded)
        if key[1] != self.fixed[graph] and key in self.variants:
            self.variants.pop(key).unlink(missing_ok=True)

    def score(self, graphs: Dict[str, Path], images: np.ndarray) -> Traced:
        """Traces a glance/focus pair through the runtime on ``images``."""
        return trace(self.desc, graphs, self.heads, images, self.opts.threads, self.opts.batch_size)

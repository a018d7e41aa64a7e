"""The glance encoder's outputs per train image, kept for a stage that does not change them.

Stages that train with the glance encoder frozen (stage 2 / ``ppo``, the demo's ``bc``, stages 1
and 3 with ``train_glance`` off) run it in eval mode on the same glance of an image every time
it is drawn, when the train images are not augmented. :class:`GlanceCache` computes the pooled
feature and the feature map of an image the first time a batch holds it (in the caller's
no-grad / autocast context, as the stage computes them; a batch holding any new image is
computed whole) and returns the kept rows once every image of a batch has been seen.
Its size is bounded: when the whole train split would take more than
``TrainSettings.glance_cache_mb`` (float32 bytes of the two outputs), the stage recomputes them
per batch and logs why.

One cache serves every stage of a run: the kept rows are used while the encoder's parameters
(by storage and in-place version), its mode and the autocast context of the call are those
they were computed with; anything else (a stage that trained the glance encoder, a resumed
checkpoint, another autocast dtype) drops them. Buffers are not part of the check: in eval mode
the encoder only reads them, and DistributedDataParallel rewrites them (same values) at every
forward.
"""
from __future__ import annotations

from typing import Callable, Hashable, Optional, Tuple

import torch
import torch.nn as nn

#: ``(pooled features (n, F), feature map (n, C, h, w))`` of a batch of glances.
Glance = Tuple[torch.Tensor, torch.Tensor]


class GlanceCache:
    """Glance features per train image, filled as batches arrive.

    Args:
        encoder: the frozen glance encoder (``x -> (pooled, feature map)``), in eval mode.
        glance: normalised images -> the encoder's input (the downsampled glance).
        size: images in the train split (indices ``0 .. size-1``).
        limit_mb: the most the kept outputs may take (float32 MB); ``<= 0`` turns the cache off.
        log: prints one line per stage (why the outputs are recomputed, when the cache is off or turns
            itself off).
        name: the stage, for the log.
        off: why the outputs cannot be kept (logged at the first batch when ``limit_mb`` > 0), or ``None``.
    """

    def __init__(self, encoder: nn.Module, glance: Callable[[torch.Tensor], torch.Tensor], size: int,
                 limit_mb: float, log: Callable[[str], None], name: str, off: Optional[str] = None) -> None:
        self.encoder, self.glance, self.size = encoder, glance, size
        self._params = list(encoder.parameters())  # read at every batch (see _state)
        self.limit_bytes = float(limit_mb) * 2 ** 20
        self.log, self.name = log, name
        self.enabled = limit_mb > 0 and off is None
        self.off = off if limit_mb > 0 else None
        self.f0: Optional[torch.Tensor] = None
        self.fmap: Optional[torch.Tensor] = None
        self.have: Optional[torch.Tensor] = None  # bool (size,) on the CPU: rows kept (no device sync to test)
        self.full = False  # every row kept: no test at all
        self.computed = 0  # images the encoder ran on
        self.state: Optional[Hashable] = None  # what the kept rows were computed with (see _state)
        self.told: set = set()  # stages already told why the outputs are recomputed

    def _state(self, x: torch.Tensor) -> Hashable:
        """The encoder's parameters (storage and in-place version of each), its mode, and the
        call's autocast context."""
        dev = x.device.type
        amp = torch.is_autocast_enabled(dev)
        return (tuple((p.data_ptr(), p._version) for p in self._params), self.encoder.training, dev, amp,
                torch.get_autocast_dtype(dev) if amp else None)

    def clear(self) -> None:
        """Frees the kept rows (a stage about to train the encoder makes them useless)."""
        self.f0 = self.fmap = self.have = self.state = None
        self.full = False

    def _tell(self) -> None:
        """Logs why the outputs are recomputed, once per stage (:attr:`name`)."""
        if self.off and self.name not in self.told:
            self.told.add(self.name)
            self.log(f"[{self.name}] glance features recomputed per batch: {self.off}")

    def _compute(self, x: torch.Tensor) -> Glance:
        self.computed += len(x)
        return self.encoder(self.glance(x))

    def _allocate(self, f0: torch.Tensor, fmap: torch.Tensor) -> bool:
        per_image = f0[0].numel() + fmap[0].numel()
        need = self.size * per_image * 4
        if need > self.limit_bytes:
            self.enabled = False
            self.off = (f"keeping them for {self.size} images needs {need / 2 ** 20:.1f} MB > "
                        f"glance_cache_mb={self.limit_bytes / 2 ** 20:g}")
            self._tell()
            return False
        dev = f0.device
        self.f0 = torch.empty((self.size,) + tuple(f0.shape[1:]), dtype=f0.dtype, device=dev)
        self.fmap = torch.empty((self.size,) + tuple(fmap.shape[1:]), dtype=fmap.dtype, device=dev)
        self.have = torch.zeros(self.size, dtype=torch.bool)
        return True

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> Glance:
        """The glance outputs of normalised images ``x`` with train indices ``idx``."""
        if not self.enabled:
            self._tell()
            return self._compute(x)
        state = self._state(x)
        if state != self.state:  # rows computed with other weights / context are of no use
            self.clear()  # freed before the next allocation, not beside it
            self.state = state
        if self.have is None:
            f0, fmap = self._compute(x)
            if self._allocate(f0, fmap):
                self._store(idx, f0, fmap)
            return f0, fmap
        idx = idx.cpu()
        if not self.full:
            miss = ~self.have[idx]
            if bool(miss.any()):
                # the whole batch, as without the cache: the rows an encoder computes for an image
                # can differ in the last bits with the batch's size, not with the other images
                f0, fmap = self._compute(x)
                dev = miss.to(f0.device)
                self._store(idx[miss], f0[dev], fmap[dev])
                return f0, fmap
        rows = idx.to(self.f0.device)
        return self.f0[rows], self.fmap[rows]

    def _store(self, idx: torch.Tensor, f0: torch.Tensor, fmap: torch.Tensor) -> None:
        rows = idx.to(self.f0.device)
        self.f0[rows] = f0.detach().to(self.f0.dtype)
        self.fmap[rows] = fmap.detach().to(self.fmap.dtype)
        self.have[idx] = True
        self.full = bool(self.have.all())

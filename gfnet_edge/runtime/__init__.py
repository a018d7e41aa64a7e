"""Device side: bundle loading, the glance/focus driver and the backends. Never imports torch
(except the optional ``torch`` backend)."""
from .api import Predictions, Runtime, RuntimeTrace

__all__ = ["Runtime", "Predictions", "RuntimeTrace"]

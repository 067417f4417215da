"""Which backend scores the pairs, from the settings (``RERANKER_BACKEND``). Imports torch only when it is used."""

from __future__ import annotations

from app.config import BackendKind, Settings
from app.engine.base import Backend


def load_backend(settings: Settings, *, model_copies: int | None = None) -> Backend:
    """Load (blocking; call it in a thread) the configured backend. ``model_copies``: see ``TorchBackend``."""
    if settings.backend is BackendKind.simulated:
        from app.engine.simulated import SimulatedDevice

        return SimulatedDevice(settings)
    from app.engine.torch_backend import TorchBackend

    return TorchBackend(settings, model_copies=model_copies)

"""The shared diffusion pipeline: one warm base model per device, adapters loaded on demand and composed.

>>> from pipelines import AdapterRef, GenerationRequest, PipelineService  # doctest: +SKIP

Names are imported on first use so that ``import pipelines.requests`` stays light (no diffusers import).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterRef": "pipelines.requests",
    "GenerationRequest": "pipelines.requests",
    "GenerationResult": "pipelines.requests",
    "PipelineService": "pipelines.service",
    "shared_service": "pipelines.service",
    "register_kind": "pipelines.kinds.conditioning",
    "save_png": "pipelines.metadata",
    "read_png_metadata": "pipelines.metadata",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

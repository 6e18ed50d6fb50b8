"""Ray Serve deployment and FastAPI app for routed and static merged models.

Imported lazily, so `esm-ray` commands that do not serve never import Ray Serve.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PredictRequest": "app", "PredictResponse": "app", "Prediction": "app", "RoutedServer": "app",
    "ServeOptions": "app", "app_builder": "app", "build": "app",
    "LLMOptions": "llm_app", "build_llm": "llm_app", "FrontOptions": "llm_front",
    "Running": "runner", "free_port": "runner", "start": "runner", "stop": "runner",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"esm_ray.serve.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'esm_ray.serve' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

"""Merge methods. Each module defines one method and registers it; import it here."""

from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, Purifier, TensorInfo
from esm_ray.methods.registry import METHODS, PURIFIERS, build_method, build_purifier, method_class, register

# Registry entries: one import per method module.
# (modules are added here as they land)

__all__ = [
    "METHODS",
    "PURIFIERS",
    "ExpertContext",
    "MergeMethod",
    "MethodParams",
    "Purifier",
    "TensorInfo",
    "build_method",
    "build_purifier",
    "method_class",
    "register",
]

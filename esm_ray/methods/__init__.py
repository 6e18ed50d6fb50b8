"""Merge methods. Each module defines one method and registers it; import it here."""

from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, Needs, Parts, Purifier, TensorInfo
from esm_ray.methods.registry import METHODS, PURIFIERS, build_method, build_purifier, method_class, register

# Registry entries: one import per method module.
from esm_ray.methods import linear, task_arithmetic, ties, dare, tsvm  # noqa: E402,F401  classic
from esm_ray.methods import slerp, karcher, model_stock, sparsified, sce  # noqa: E402,F401  mergekit's
from esm_ray.methods import nearswap, arcee_fusion, passthrough, ram  # noqa: E402,F401  mergekit's
from esm_ray.methods import esm, pave, regmean  # noqa: E402,F401  data-aware
from esm_ray.methods import esm_pp, sim  # noqa: E402,F401  routed
from esm_ray.methods import adamerging, concrete  # noqa: E402,F401  searched

__all__ = [
    "METHODS",
    "PURIFIERS",
    "ExpertContext",
    "MergeMethod",
    "MethodParams",
    "Needs",
    "Parts",
    "Purifier",
    "TensorInfo",
    "build_method",
    "build_purifier",
    "method_class",
    "register",
]

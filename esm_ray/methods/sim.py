"""`sim`: ESM++'s residual experts routed by SiM (task subspaces of pretrained features).

Before the merge loop each expert side runs the *pretrained* backbone (the spec's base; see
runtime/support.py) over `support_samples` of its calibration rows and sends their pooled features:
the mean of the last hidden state over non-padding tokens. The coordinator fits one rank-k
affine subspace per task (`core.routing.fit_subspace`). At inference one backbone pass gives a
sample's feature, the task with the smallest projection residual wins, and every routed layer
applies that task's residual expert. The backbone is stored with the routed model (or only
referenced by URI), since the merged weights do not give the pretrained features. The
prototypes are stored as well, so both routers can be compared on the same experts.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field
from torch import Tensor

from esm_ray.core.routing import fit_subspace, stack_subspaces
from esm_ray.methods.base import BASE_WEIGHTS, BaseWeights, ExpertContext
from esm_ray.methods.esm_pp import ESMPlusPlus, RoutedParams
from esm_ray.methods.registry import register
from esm_ray.routed.format import BACKBONE_FILE

log = logging.getLogger(__name__)


class SimParams(RoutedParams):
    subspace_rank: int = Field(8, ge=1, description="rank k of each task's feature subspace")
    support_samples: int = Field(32, ge=2, description="support samples per task for the subspaces")
    center: bool = Field(True, description="centre each subspace on its task's mean feature")
    normalize: bool = Field(True, description="L2-normalise features before fitting and scoring")
    relative: bool = Field(False, description="score by the residual divided by the offset from the mean")
    energy: float | None = Field(None, gt=0, le=1, description="optionally keep fewer directions per task: "
                                                               "the smallest k holding this energy")
    backbone: Literal["copy", "reference"] = Field(
        "copy", description="store the pretrained backbone with the routed model, or only its URI")


@register
class SiM(ESMPlusPlus[SimParams]):
    """ESM++ experts with the SiM router: one decision per sample from pretrained features."""

    name = "sim"
    summary = ("static merge + low-rank residual experts, routed per sample by SiM task subspaces of "
               "pretrained features")
    router_kind = "sim"

    def __init__(self, params: SimParams, n_experts: int, seed: int = 0) -> None:
        super().__init__(params, n_experts, seed)
        self._means: Tensor | None = None
        self._bases: Tensor | None = None
        self._fitted_samples = 0

    def support_samples(self) -> int:
        return self.params.support_samples

    def support_fuse(self, parts: list[Any], ctxs: list[ExpertContext]) -> None:
        super().support_fuse(parts, ctxs)
        p = self.params
        feats = [s.features for s in self._support]
        missing = [t for t, f in zip(self._tasks, feats) if f is None]
        if missing:
            raise RuntimeError(f"sim: no support features from expert {missing[0]!r}")
        spaces = [fit_subspace(f, p.subspace_rank, p.center, p.normalize, p.energy) for f in feats if f is not None]
        self._means, self._bases = stack_subspaces(spaces)
        self._fitted_samples = min(int(f.shape[0]) for f in feats if f is not None)

    def routers(self) -> list[str]:
        return ["sim", "prototype"]

    def sim_state(self) -> tuple[Tensor | None, Tensor | None, dict[str, Any] | None, dict[str, BaseWeights]]:
        p = self.params
        meta: dict[str, Any] = {"rank": p.subspace_rank, "samples": self._fitted_samples,
                                "center": p.center, "normalize": p.normalize, "relative": p.relative,
                                "energy": p.energy,
                                "feature": "mean of the pretrained backbone's last hidden state over tokens"}
        extra: dict[str, BaseWeights] = {}
        if p.backbone == "reference":
            meta["backbone"] = {"uri": self._support[0].base_uri}
        else:
            extra[BACKBONE_FILE] = BASE_WEIGHTS  # written by the runtime
            meta["backbone"] = BACKBONE_FILE
        return self._means, self._bases, meta, extra

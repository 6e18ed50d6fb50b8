"""`sim`: ESM++'s residual experts routed by SiM (task subspaces of pretrained features).

Before the merge loop each expert runs the *pretrained* backbone (the spec's base, read through
esm_ray.io) over `support_samples` of its calibration rows and sends their pooled features:
the mean of the last hidden state over non-padding tokens. The coordinator fits one rank-k
affine subspace per task (`core.routing.fit_subspace`). At inference one backbone pass gives a
sample's feature, the task with the smallest projection residual wins, and every routed layer
applies that task's residual expert. The backbone is stored with the routed model (or only
referenced by URI), since the merged weights do not give the pretrained features. The
prototypes are stored as well, so both routers can be compared on the same experts.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import save as st_save
from torch import Tensor

from esm_ray.routed.format import BACKBONE_FILE
from esm_ray.core.routing import fit_subspace, stack_subspaces
from esm_ray.models.features import pooled_features
from esm_ray.errors import InputError
from esm_ray.methods.base import ExpertContext
from esm_ray.methods.esm_pp import ESMPlusPlus, RoutedParams, SupportPart
from esm_ray.models.heads import read_expert_head
from esm_ray.methods.registry import register

log = logging.getLogger(__name__)


def support_features(side: Any, samples: int, batch_size: int = 16) -> Tensor:
    """Pooled pretrained-backbone features (n, d) of an expert side's first `samples` rows.

    The rows are drawn like calibration rows (same file, same seed, same max_length); text rows
    are tokenized with the base model's tokenizer.
    """
    from esm_ray.models.hf import StoredModel
    from esm_ray.models.text import encode_rows, make_batches
    from esm_ray.stats.data import load_calibration_rows

    spec, expert = side.spec, side.expert
    if not expert.data:
        raise InputError(f"expert {expert.name!r}: SiM needs support samples (`data`)")
    rows = load_calibration_rows(expert.data, samples, spec.calibration.seed)
    src = StoredModel(spec.base, spec.s3)
    tokenizer = None
    with tempfile.TemporaryDirectory(prefix="esm-ray-sim-") as tmp:
        if any("input_ids" not in r for r in rows):
            tok_dir = src.tokenizer_dir(Path(tmp))
            if tok_dir is None:
                raise InputError(f"{expert.data}: rows are text but the base {spec.base} has no tokenizer")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        ids = encode_rows(rows, tokenizer, spec.calibration.max_length)
    model = src.load(torch.float32, "cpu")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and pad >= 0 else 0
    feats = [pooled_features(model, b_ids, b_mask) for b_ids, b_mask in make_batches(ids, batch_size, pad)]
    return torch.cat(feats).float()


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

    def support_part(self, side: Any, ctx: ExpertContext) -> SupportPart:
        head, labels = read_expert_head(side.model)
        feats = support_features(side, self.params.support_samples)
        return SupportPart(head=head, labels=labels, features=feats, base_uri=side.spec.base, s3=side.spec.s3)

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

    def sim_state(self) -> tuple[Tensor | None, Tensor | None, dict[str, Any] | None, dict[str, bytes]]:
        p = self.params
        meta: dict[str, Any] = {"rank": p.subspace_rank, "samples": self._fitted_samples,
                                "center": p.center, "normalize": p.normalize, "relative": p.relative,
                                "energy": p.energy,
                                "feature": "mean of the pretrained backbone's last hidden state over tokens"}
        extra: dict[str, bytes] = {}
        base_uri, s3 = self._support[0].base_uri, self._support[0].s3
        if p.backbone == "reference":
            meta["backbone"] = {"uri": base_uri}
        else:
            from esm_ray.io.reader import open_model

            with open_model(base_uri, s3) as reader:
                extra[BACKBONE_FILE] = st_save({k: reader.get(k).contiguous() for k in reader.keys()})
            meta["backbone"] = BACKBONE_FILE
        return self._means, self._bases, meta, extra

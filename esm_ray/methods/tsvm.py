"""`tsvm`: Task Singular Vectors Merging (TSV-M), as in the TSV-M and ESM reference code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from esm_ray.core.lora import LoraFactors, LowRank, lora_svd
from esm_ray.core.rowblocks import TaskRows, in_row_blocks
from esm_ray.core.tsvm import (drop_null_triplets, task_triplets, task_triplets_rows, tsv_rank, tsvm_factors, tsvm_fuse,
                               tsvm_fuse_rows)
from esm_ray.methods._common import ADAPTER_SCALE_NOTE, RESCALE_HINT, in_expert_order, lambda_field, weights_of
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register


@dataclass(frozen=True)
class LowRankPart:
    """The top singular triplets of one expert's task vector: τ ≈ u diag(s) vh."""

    u: Tensor   # (d_out, k)
    s: Tensor   # (k,)
    vh: Tensor  # (k, d_in)


class TsvmParams(MethodParams):
    k: int | None = Field(None, ge=1, description="per-task rank for 2-D tensors; "
                                                  "default floor(min(d_out, d_in) / T), at least 1")
    lambda_: float = lambda_field()


@register
class Tsvm(MergeMethod[TsvmParams]):
    """2-D tensors: per expert, the top-k SVD triplets of τ_i (k = floor(min(d_out, d_in) / T)
    unless given); the coordinator scales each S_i by w_i, concatenates, replaces both bases by
    their polar factors and returns λ · polar(U_cat) diag(S_cat) polar(V_cat)^T. Every other
    tensor: λ · Σ w_i τ_i / T (the plain mean of task vectors when all weights are 1).
    Embedding matrices are 2-D and take the SVD branch.
    """

    name = "tsvm"
    summary = "TSV-M: per-task top singular vectors, decorrelated by polar factors"
    zero_for_zero_tasks = True
    decomposes = True
    factored = True

    def adapters_note(self) -> str | None:
        if self.params.lambda_ != 1.0 or self.params.k is not None:
            return None
        return (f"`lambda` 1 (the default): {ADAPTER_SCALE_NOTE} (TSV-M at lambda 0.3 with T = 10 scored level with "
                f"task arithmetic tuned on validation); consider {RESCALE_HINT}, lambda "
                f"{1 / self.n_experts ** 0.5:.2f}, or choosing it on validation")

    def rank(self, shape: tuple[int, int]) -> int:
        k = self.params.k
        return min(k, min(shape)) if k is not None else tsv_rank(shape, self.n_experts)

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        if in_row_blocks(expert):  # a large matrix: never whole in float64 (core.rowblocks)
            u, s, vh = task_triplets_rows(TaskRows.of(expert, base), self.rank((expert.shape[0], expert.shape[1])))
            return LowRankPart(u.float().contiguous(), s.float(), vh.float().contiguous())
        tv = expert.float() - base.float()
        if tv.ndim != 2:
            return tv
        # SVD in float64 for accuracy (and less sensitivity to the BLAS); factors ship as float32.
        u, s, vh = task_triplets(tv, self.rank((tv.shape[0], tv.shape[1])))
        return LowRankPart(u.float().contiguous(), s.float(), vh.float().contiguous())

    def prepare_lora(self, info: TensorInfo, lora: LoraFactors, ctx: ExpertContext) -> Any:
        """A LoRA expert's top-k triplets of s·BA from thin QRs of its factors and the SVD of the
        (r, r) core (core.lora.lora_svd): the same part as `prepare` on the densified tensor,
        in O((d_out + d_in) r²)."""
        u, s, vh = drop_null_triplets(*lora_svd(lora, self.rank(lora.shape)), resolution=torch.float32)
        return LowRankPart(u.float().contiguous(), s.float(), vh.float().contiguous())

    def fuse_lowrank(self, info: TensorInfo, base: Tensor, parts: list[Any],
                     ctxs: list[ExpertContext]) -> LowRank | None:
        """The 2-D update polar(U_cat) diag(S_cat) polar(V_cat)ᵀ kept factored (rank Σk)."""
        parts, ctxs = in_expert_order(list(parts), ctxs)
        if not parts or not all(isinstance(p, LowRankPart) for p in parts):
            return None
        lam = float(self.params_for(info).lambda_)
        keep = [(p, w) for p, w in zip(parts, weights_of(ctxs)) if w != 0.0 and p.s.numel() > 0]
        if not keep:
            return LowRank(torch.zeros(base.shape[0], 0, dtype=torch.float64),
                           torch.zeros(0, base.shape[1], dtype=torch.float64))
        b, a = tsvm_factors([p.u.double() for p, _ in keep], [p.s.double() * w for p, w in keep],
                            [p.vh.double() for p, _ in keep])
        return LowRank(b * lam, a)

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        parts, ctxs = in_expert_order(parts, ctxs)
        weights = weights_of(ctxs)
        lam = float(self.params_for(info).lambda_)
        low_rank = [isinstance(p, LowRankPart) for p in parts]
        if any(low_rank) and not all(low_rank):
            raise ValueError(f"{info.name}: mixed low-rank and dense parts")
        if not any(low_rank):
            acc = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
            for tv, w in zip(parts, weights):
                acc += tv.float() * w
            return acc * (lam / len(parts))
        # Experts with weight 0 or a zero task vector contribute no triplet at all.
        keep = [(p, w) for p, w in zip(parts, weights) if w != 0.0 and p.s.numel() > 0]
        if not keep:
            return torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        if in_row_blocks(base):  # a large matrix: by row blocks where tall (tsvm_fuse_rows)
            return tsvm_fuse_rows([p.u for p, _ in keep], [p.s.double() * w for p, w in keep],
                                  [p.vh for p, _ in keep], lam)
        us = [p.u.double() for p, _ in keep]
        ss = [p.s.double() * w for p, w in keep]
        vhs = [p.vh.double() for p, _ in keep]
        return (tsvm_fuse(us, ss, vhs) * lam).float()

"""Routed experts on top of a static merge: ESM++ residual experts, the prototype router and
the SiM router.

Residual experts (ESM++). At a routed linear layer with merged weight W_m, task t's residual
δW_t = W_t − W_m is compressed by ESD with the layer's calibration Gram G = Σ x xᵀ of the
fine-tuned inputs: B_t = the top-r eigenvectors of δW_t G δW_tᵀ (d_out, r), A_t = B_tᵀ δW_t
(r, d_in), so B_t A_t = P_r δW_t is the rank-r update with the smallest output-shift error on
the calibration rows. It is applied as B_t (A_t x), never as a dense matrix. When the residual's
numerical rank is below r the missing columns of B (rows of A) are zero, so every task of a
layer stores factors of one shape.

Prototype router (ESM++). Per routed layer and per sample, the feature is the token mean of
that layer's input over the sample's own non-padding tokens; the score of task t is the cosine
with the prototype p_t = s1 / n (the mean input of the fine-tuned expert at that layer); the
sample takes the top-1 task's expert. Each layer decides on its own.

SiM router. Per task, a rank-k affine subspace fitted to the pretrained backbone's pooled
features of a few support samples; a sample's score is minus the squared projection residual
of its feature onto that subspace; top-1; one decision per sample for all routed layers.
Choices made here: features are L2-normalised first (sentence features compare by angle), the
subspace is centred on the task's mean support feature, and the residual is not divided by
anything (the distance to an affine subspace). All three are switchable.

Everything here works row by row: a sample's decision never depends on the other samples of
its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from esm_ray.core.esd import esd_from_gram

# ---- residual experts -----------------------------------------------------------------------


@dataclass(frozen=True)
class LowRankExpert:
    """One task's residual expert at one layer: δW ≈ B A.

    B: (d_out, r) orthonormal columns (or zero columns past the residual's rank)
    A: (r, d_in)  coordinates Bᵀ δW
    """

    B: Tensor
    A: Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def dense(self) -> Tensor:
        """B A, for tests and small layers. (d_out, d_in)"""
        return self.B @ self.A

    def apply(self, x: Tensor) -> Tensor:
        """B (A x) on the last dimension of x: (..., d_in) -> (..., d_out)."""
        return (x @ self.A.T.to(x.dtype)) @ self.B.T.to(x.dtype)

    def padded(self, rank: int) -> "LowRankExpert":
        """The same update with exactly `rank` factors: zero columns/rows appended (or a cut)."""
        r = self.rank
        if r >= rank:
            return LowRankExpert(self.B[:, :rank].contiguous(), self.A[:rank].contiguous())
        b = torch.zeros(self.B.shape[0], rank, dtype=self.B.dtype, device=self.B.device)
        a = torch.zeros(rank, self.A.shape[1], dtype=self.A.dtype, device=self.A.device)
        b[:, :r] = self.B
        a[:r] = self.A
        return LowRankExpert(b, a)

    def to(self, dtype: torch.dtype) -> "LowRankExpert":
        return LowRankExpert(self.B.to(dtype), self.A.to(dtype))


def residual_expert(expert: Tensor, merged: Tensor, gram: Tensor, n: int, rank: int) -> LowRankExpert:
    """Task t's rank-r residual expert at one layer, by ESD of δW = W_t − W_merged.

    Args:
        expert: (d_out, d_in) the fine-tuned weight W_t
        merged: (d_out, d_in) the final merged weight W_m (as written)
        gram:   (d_in, d_in) Σ x xᵀ of the fine-tuned model's inputs at this layer
        n:      rows behind `gram`
        rank:   r; the result has exactly r factors (zero-padded past the residual's rank)
    Returns:
        LowRankExpert in float64 with B (d_out, r), A (r, d_in).
    """
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    if expert.shape != merged.shape:
        raise ValueError(f"shapes differ: expert {tuple(expert.shape)}, merged {tuple(merged.shape)}")
    delta = expert.to(torch.float64) - merged.to(torch.float64)
    esd = esd_from_gram(delta, gram, n, k=rank)
    return LowRankExpert(esd.basis, esd.coords).padded(rank)


def stack_experts(experts: list[LowRankExpert]) -> tuple[Tensor, Tensor]:
    """T experts of one layer (same rank) as B (T, d_out, r) and A (T, r, d_in)."""
    if not experts:
        raise ValueError("no experts to stack")
    return torch.stack([e.B for e in experts]), torch.stack([e.A for e in experts])


def apply_routed(x: Tensor, B: Tensor, A: Tensor, choice: Tensor) -> Tensor:
    """Per-sample expert updates B_c (A_c x), grouped by expert so each expert runs once.

    Args:
        x:      (N, ..., d_in) inputs; dim 0 is the sample
        B:      (T, d_out, r)
        A:      (T, r, d_in)
        choice: (N,) long, the task of each sample; a negative value means no expert
    Returns:
        (N, ..., d_out) updates (zero for samples without an expert), in x's dtype.
    """
    if choice.shape != (x.shape[0],):
        raise ValueError(f"choice must be ({x.shape[0]},), got {tuple(choice.shape)}")
    first = int(choice[0]) if choice.numel() else -1
    if first >= 0 and bool((choice == first).all()):  # one expert for the whole batch: no regrouping
        return (x @ A[first].T.to(x.dtype)) @ B[first].T.to(x.dtype)
    out = x.new_zeros(*x.shape[:-1], B.shape[1])
    for t in torch.unique(choice).tolist():
        if t < 0:
            continue
        rows = torch.nonzero(choice == t).squeeze(1)
        xs = x.index_select(0, rows)
        out.index_copy_(0, rows, (xs @ A[t].T.to(x.dtype)) @ B[t].T.to(x.dtype))
    return out


# ---- prototype router -----------------------------------------------------------------------


def token_mean(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample mean over tokens, padding excluded.

    x: (N, L, d) with mask (N, L) of 1 = token, 0 = padding (None: every token counts),
       or (N, d), returned as is.
    Returns (N, d).
    """
    if x.ndim == 2:
        return x
    if x.ndim != 3:
        raise ValueError(f"expected (N, L, d) or (N, d) inputs, got {tuple(x.shape)}")
    if mask is None:
        return x.mean(1)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match inputs {tuple(x.shape)}")
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def cosine_scores(features: Tensor, prototypes: Tensor, eps: float = 1e-12) -> Tensor:
    """cos(feature_i, p_t). features (N, d), prototypes (T, d) -> (N, T)."""
    f = features.to(prototypes.dtype)
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(eps)
    p = prototypes / prototypes.norm(dim=-1, keepdim=True).clamp_min(eps)
    return f @ p.T


def prototype_route(x: Tensor, mask: Tensor | None, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """Top-1 task per sample by cosine between its token-mean input and each prototype.

    x: (N, L, d_in) or (N, d_in); mask: (N, L) or None; prototypes: (T, d_in).
    Returns (choice (N,) long, scores (N, T)).
    """
    scores = cosine_scores(token_mean(x, mask), prototypes)
    return scores.argmax(-1), scores


# ---- SiM router -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSubspace:
    """One task's support manifold: an affine subspace mean + span(basis).

    mean:  (d,)   the mean support feature (zeros when not centred)
    basis: (d, k) orthonormal columns (zero columns past the support's rank)
    """

    mean: Tensor
    basis: Tensor


def mean_token_loglik(logits: Tensor, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Each sequence's mean next-token log-probability under a causal LM.

    logits:    (N, L, V) the LM's logits over input_ids
    input_ids: (N, L)
    mask:      (N, L) 1 = token, 0 = padding (either side); None: every token counts
    Returns (N,) float32: the mean over positions i < L − 1 where tokens i and i + 1 are real of
    log p(x_{i+1} | x_{≤i}) = logit of x_{i+1} − logsumexp of the logits at i; 0 for a sequence of
    fewer than two real tokens.
    """
    if logits.ndim != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    mask = torch.ones_like(input_ids) if mask is None else mask
    lg = logits[:, :-1].float()
    lp = lg.gather(-1, input_ids[:, 1:, None])[..., 0] - torch.logsumexp(lg, -1)
    w = (mask[:, 1:] * mask[:, :-1]).to(lp.dtype)
    return (lp * w).sum(1) / w.sum(1).clamp_min(1)


def likelihood_pairs(prototype_scores: Tensor, eligible: Tensor, m: int | None = None,
                     margin: float | None = None) -> Tensor:
    """Which (sequence, task) pairs the likelihood router scores with an adapter.

    prototype_scores: (N, T) summed prototype cosines (higher = better)
    eligible:         (T,) bool, the tasks whose experts model their own task's text better than the base
    m:                how many eligible tasks to score per sequence: those with the m highest
                      prototype scores; None (or m ≥ the eligible count) scores every eligible task
    margin:           skip a sequence whose two best eligible prototype scores are at least this
                      far apart (the prototypes are sure); None never skips
    Returns (N, T) bool: for a sequence whose prototype top-1 is eligible (and, with a margin,
    whose best eligible score leads the second by less than it), its m best eligible tasks by
    prototype score (the top-1 always among them); no task otherwise. Ties between prototype
    scores go to the lower task index.
    """
    if m is not None and m < 1:
        raise ValueError(f"likelihood candidates must be at least 1 (got {m})")
    n, t = prototype_scores.shape
    n_eligible = int(eligible.sum())
    on = eligible[prototype_scores.argmax(-1)]
    if margin is not None and n_eligible > 1:
        best = prototype_scores.float().masked_fill(~eligible[None, :], float("-inf")).topk(2, dim=-1).values
        on = on & (best[:, 0] - best[:, 1] < margin)
    elif margin is not None:
        on = torch.zeros_like(on)  # one eligible task: nothing to compare it with
    if m is None or m >= n_eligible:
        cand = eligible[None, :].expand(n, t).clone()
    else:
        s = prototype_scores.float().masked_fill(~eligible[None, :], float("-inf"))
        # a stable descending sort: equal scores keep task order, as argmax breaks ties
        idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :m]
        cand = torch.zeros(n, t, dtype=torch.bool, device=s.device).scatter_(1, idx, True) & eligible[None, :]
    return cand & on[:, None]


def prefilled_pairs(pairs: Tensor) -> Tensor:
    """The pairs of `likelihood_pairs` that need an adapter prefill: those of sequences with at
    least two candidates (a sole candidate is the prototype top-1, and wins unscored).
    pairs: (N, T) bool -> (N, T) bool"""
    return pairs & (pairs.sum(-1) > 1)[:, None]


def likelihood_route(prototype_scores: Tensor, logliks: Tensor, eligible: Tensor, m: int | None = None,
                     margin: float | None = None) -> Tensor:
    """The likelihood router's scores: the prototype router decides whether a sequence belongs
    to an eligible task (one whose expert models its own task's text better than the base);
    if so, of its candidates (`likelihood_pairs`: the m eligible tasks the prototypes rank
    highest, every eligible task when m is None) the one whose expert gives the sequence the
    highest likelihood wins.

    prototype_scores: (N, T) summed prototype cosines (higher = better)
    logliks:          (N, T) mean token log-likelihood of each sequence under each task's
                      expert (read only at the candidates)
    eligible:         (T,) bool
    m:                candidates per sequence, or None for every eligible task
    margin:           sequences the prototypes are sure of route as their top-1 (`likelihood_pairs`)
    Returns (N, T) scores whose argmax is the route: the log-likelihoods at the candidates and
    −inf elsewhere where the prototype top-1 is eligible; 0 at the prototype top-1 and −inf
    elsewhere otherwise. A sequence routes as its prototype top-1 when no task is eligible.
    """
    top = prototype_scores.argmax(-1)
    cand = likelihood_pairs(prototype_scores, eligible, m, margin)
    out = torch.full_like(prototype_scores, float("-inf"))
    by_ll = cand.any(-1)
    rows = by_ll.nonzero().flatten()
    if rows.numel():
        out[rows] = logliks[rows].float().masked_fill(~cand[rows], float("-inf")).to(out.dtype)
    other = (~by_ll).nonzero().flatten()
    out[other, top[other]] = 0.0
    return out


def _prepare(features: Tensor, normalize: bool) -> Tensor:
    f = features.to(torch.float64)
    if normalize:
        f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return f


def fit_subspace(features: Tensor, rank: int, center: bool = True, normalize: bool = True,
                 energy: float | None = None) -> TaskSubspace:
    """Rank-k subspace of one task's support features (n, d), by thin SVD.

    Args:
        rank:      k, the number of directions kept (at most the support's numerical rank;
                   the basis is zero-padded back to k columns)
        center:    subtract the mean support feature first (an affine subspace)
        normalize: L2-normalise each feature first
        energy:    optionally keep fewer directions: the smallest k' ≤ k whose squared
                   singular values hold this fraction of the total
    """
    if rank < 0:
        raise ValueError(f"rank must be ≥ 0, got {rank}")
    f = _prepare(features, normalize)
    mean = f.mean(0) if center else torch.zeros(f.shape[1], dtype=f.dtype)
    _, s, vh = torch.linalg.svd(f - mean, full_matrices=False)
    tol = max(f.shape) * torch.finfo(torch.float64).eps * (float(s[0]) if s.numel() else 0.0)
    keep = min(rank, int((s > tol).sum()))
    if energy is not None and keep:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        frac = torch.cumsum(s.square(), 0) / s.square().sum()
        keep = min(keep, int((frac < energy - 1e-12).sum()) + 1)
    basis = torch.zeros(f.shape[1], rank, dtype=f.dtype)
    basis[:, :keep] = vh[:keep].T
    return TaskSubspace(mean, basis)


def sim_residuals(features: Tensor, means: Tensor, bases: Tensor, normalize: bool = True,
                  relative: bool = False) -> Tensor:
    """Squared projection residual ||(I − V_t V_tᵀ)(φ − μ_t)||² of each feature on each task.

    features (N, d), means (T, d), bases (T, d, k) -> (N, T), float64.
    relative: divide by ||φ − μ_t||² (the fraction of the offset outside the subspace).
    """
    f = _prepare(features, normalize)
    diff = f[:, None, :] - means.to(device=f.device, dtype=f.dtype)[None]  # (N, T, d)
    v = bases.to(device=f.device, dtype=f.dtype)
    coords = torch.einsum("ntd,tdk->ntk", diff, v)                      # (N, T, k)
    res = (diff - torch.einsum("ntk,tdk->ntd", coords, v)).square().sum(-1)
    if relative:
        res = res / diff.square().sum(-1).clamp_min(1e-24)
    return res


def sim_route(features: Tensor, means: Tensor, bases: Tensor, normalize: bool = True,
              relative: bool = False) -> tuple[Tensor, Tensor]:
    """Top-1 task per sample: the smallest projection residual. Returns (choice (N,), scores (N, T))
    with score = −residual (higher is better)."""
    scores = -sim_residuals(features, means, bases, normalize, relative)
    return scores.argmax(-1), scores


def stack_subspaces(spaces: list[TaskSubspace]) -> tuple[Tensor, Tensor]:
    """T subspaces (same k) as means (T, d) and bases (T, d, k)."""
    return torch.stack([s.mean for s in spaces]), torch.stack([s.basis for s in spaces])


# ---- features ---------------------------------------------------------------------------------


def vote(layer_choices: Tensor, n_tasks: int, layer_scores: Tensor | None = None) -> Tensor:
    """One task per sample from per-layer choices (N, L): the most used expert; ties go to
    the larger mean score when scores (N, L, T) are given, else to the lower task index."""
    counts = torch.zeros(layer_choices.shape[0], n_tasks, dtype=torch.float64, device=layer_choices.device)
    valid = layer_choices >= 0
    counts.scatter_add_(1, layer_choices.clamp_min(0), valid.to(torch.float64))
    if layer_scores is not None:
        # scores are cosines in [-1, 1]: ±0.25 · mean breaks ties but never overturns a count
        counts = counts + 0.25 * layer_scores.to(torch.float64).mean(1)
    return counts.argmax(-1)

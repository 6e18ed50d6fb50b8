"""ESM: essential subspace merging of T tasks' ESD factors.

Per layer, each task brings its essential factors (E_t, C_t, λ_t) from ESD. The recipe:

1. eigen-scaling: s_i = (λ_i / mean λ)^γ (γ = 0.15), renormalised to mean 1; column i of E_t
   and row i of C_t are both multiplied by s_i;
2. (ViT recipe) inter-task scaling: C_t is multiplied by (n_t / mean_t n_t)^2, n_t = ||ΔW_t||_F;
3. stack U = [E_1 S_1 … E_T S_T] (d_out, Tk) and V = [S_1 C_1; …; S_T C_T] (Tk, d_in);
4. (ViT recipe) inter-column scaling: column j of V is multiplied by (c_j / mean c)^2,
   c_j = ||V[:, j]||;
5. orthogonalise each factor by its polar factor and put back the mean singular values:
   ΔW = m · ms(U) · ms(V) · polar(U) · polar(V),  m = 2 (ViT) or 1 (RoBERTa);
   or (magnitude 'energy') with the one c that gives ||ΔW||_F = sqrt(Σ_t ||E_t C_t||_F²).

Both factors become partial isometries, so the merged update has a flat spectrum: every
nonzero singular value equals m · ms(U) · ms(V). The scalings only choose the directions.
After all layers are merged, each linear-layer type (e.g. every block's query weight) is
rescaled across depth by (||ΔW_l|| / mean_l ||ΔW_l||)^p with p = 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from esm_ray.core.esd import ESD
from esm_ray.core.linalg import polar, polar_core, polar_gram
from esm_ray.core.rowblocks import StackedRows


@dataclass(frozen=True)
class ESMRecipe:
    """The scaling heuristics of one ESM variant. A power of 0 switches a scaling off."""

    name: str
    eigen_exponent: float = 0.15
    inter_task_power: float = 0.0
    inter_column_power: float = 0.0
    multiplier: float = 1.0
    inter_layer_power: float = 2.0
    magnitude: Literal["mean_singular", "energy"] = "mean_singular"


PRESETS: dict[str, ESMRecipe] = {
    # CLIP ViT code: every heuristic, and a final ×2.
    "vit": ESMRecipe("vit", eigen_exponent=0.15, inter_task_power=2.0, inter_column_power=2.0,
                     multiplier=2.0, inter_layer_power=2.0),
    # RoBERTa (GLUE) code: eigen-scaling and Procrustes only.
    "roberta": ESMRecipe("roberta", eigen_exponent=0.15, inter_task_power=0.0, inter_column_power=0.0,
                         multiplier=1.0, inter_layer_power=2.0),
}


def eigen_scales(eigenvalues: Tensor, exponent: float = 0.15) -> Tensor:
    """s_i = (λ_i / mean λ)^exponent, renormalised to mean 1. (k,) -> (k,)"""
    lam = eigenvalues.to(torch.float64).clamp_min(0)
    if lam.numel() == 0 or float(lam.mean()) <= 0:
        return torch.ones_like(lam)
    s = (lam / lam.mean()).pow(exponent)
    return s / s.mean()


def stack_factors(parts: list[ESD], recipe: ESMRecipe, norms: list[float] | None = None,
                  dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Scaled and stacked factors U (d_out, Σk_t) and V (Σk_t, d_in), before orthogonalisation.

    norms: ||ΔW_t||_F per task for the inter-task scaling; when None, ||C_t||_F is used.
    """
    scales = _eigen_scales_of(parts, recipe, dtype)
    u_cat = torch.cat([p.basis.to(dtype) * s for p, s in zip(parts, scales)], dim=1)
    return u_cat, _stack_coords(parts, recipe, norms, scales, dtype)


def _eigen_scales_of(parts: list[ESD], recipe: ESMRecipe, dtype: torch.dtype) -> list[Tensor]:
    """Step 1's s per task, (k_t,) in `dtype`."""
    if not parts:
        raise ValueError("ESM needs at least one task")
    return [eigen_scales(p.eigenvalues, recipe.eigen_exponent).to(dtype) for p in parts]


def _stack_coords(parts: list[ESD], recipe: ESMRecipe, norms: list[float] | None, scales: list[Tensor],
                  dtype: torch.dtype) -> Tensor:
    """V = [S_1 C_1; …; S_T C_T] with steps 2 and 4. (Σk_t, d_in)"""
    if recipe.inter_task_power:
        ns = [float(p.coords.to(torch.float64).norm()) for p in parts] if norms is None else [float(x) for x in norms]
        mean_n = sum(ns) / len(ns)
    vs = []
    for t, (p, s) in enumerate(zip(parts, scales)):
        v = p.coords.to(dtype) * s[:, None]
        if recipe.inter_task_power and mean_n > 0:
            v = v * (ns[t] / mean_n) ** recipe.inter_task_power
        vs.append(v)
    v_cat = torch.cat(vs, dim=0)
    if recipe.inter_column_power and v_cat.shape[0]:
        c = v_cat.norm(dim=0)
        mc = c.mean()
        if mc > 0:
            v_cat = v_cat * (c / mc).pow(recipe.inter_column_power)
    return v_cat


def esm_fuse(parts: list[ESD], recipe: ESMRecipe, norms: list[float] | None = None,
             dtype: torch.dtype = torch.float64, route: Literal["gram", "svd"] = "gram") -> Tensor:
    """Merged update of one ESD layer, before inter-layer scaling and α. (d_out, d_in) in `dtype`.

    route 'gram' (default): each polar factor from an eigh of the factor's smaller Gram
    (`linalg.polar_gram`), e.g. 2304 x 2304 for U of a 3072 x 768 layer with T = 3, k = 768,
    instead of the thin SVD of the 3072 x 2304 U; agrees with 'svd' to about eps · κ², see
    docs/methods-subspace.md. route 'svd': the thin SVD of each factor (`linalg.polar`).
    """
    c, pu, pv = esm_factors(parts, recipe, norms, dtype, route)
    if pu.shape[1] == 0:
        return torch.zeros(pu.shape[0], pv.shape[1], dtype=dtype, device=pu.device)
    dw = pu @ pv
    del pu
    dw *= c  # in place: the values of c · (pu pv) without a second (d_out, d_in) matrix
    return dw


def esm_factors(parts: list[ESD], recipe: ESMRecipe, norms: list[float] | None = None,
                dtype: torch.dtype = torch.float64,
                route: Literal["gram", "svd"] = "gram") -> tuple[Tensor, Tensor, Tensor]:
    """esm_fuse kept factored: (c, polar(U) (d_out, Σk), polar(V) (Σk, d_in)), ΔW = c · polar(U) polar(V)."""
    if route not in ("gram", "svd"):
        raise ValueError(f"route must be 'gram' or 'svd', got {route!r}")
    u_cat, v_cat = stack_factors(parts, recipe, norms, dtype)
    if u_cat.shape[1] == 0:
        return torch.zeros((), dtype=dtype), u_cat, v_cat
    fn = polar_gram if route == "gram" else polar
    pu, msu = fn(u_cat)
    pv, msv = fn(v_cat)
    if recipe.magnitude == "energy":
        return energy_magnitude(parts, pu, pv), pu, pv
    return recipe.multiplier * msu * msv, pu, pv


def energy_magnitude(parts: list[ESD], pu: Tensor, pv: Tensor) -> Tensor:
    """c with ||c · polar(U) polar(V)||_F = sqrt(Σ_t ||E_t C_t||_F²): the flat update carries the
    energy of the tasks' essential parts, as an orthogonal sum of them would (and as TSV-M's
    merge carries its truncations' energy). pu (d_out, m), pv (m, d_in). A 0-d tensor."""
    # ||pu pv||_F² = tr((puᵀ pu)(pv pvᵀ)), without forming the (d_out, d_in) product
    return _energy_c(parts, pu.T.to(torch.float64) @ pu.to(torch.float64), pv).to(pu.dtype)


def _energy_c(parts: list[ESD], pu_gram: Tensor, pv: Tensor) -> Tensor:
    """energy_magnitude's c from puᵀ pu (m, m) float64, in float64."""
    target = torch.stack([p.coords.to(torch.float64).square().sum() for p in parts]).sum().sqrt()
    size = (pu_gram * (pv.to(torch.float64) @ pv.T.to(torch.float64))).sum()
    if float(size) <= 0:
        return torch.zeros((), dtype=torch.float64, device=pv.device)
    return target / size.sqrt()


def esm_fuse_rows(parts: list[ESD], recipe: ESMRecipe, norms: list[float] | None = None, scale: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """scale · `esm_fuse` (float64, route 'gram') of a tall layer (d_out ≥ Σk, e.g. an LM head)
    by row blocks, without its (d_out, Σk) stacked U or a (d_out, d_in) matrix in float64.

    polar(U) = U · K from the eigh of UᵀU summed over row blocks (`linalg.polar_core`: the
    route-'gram' factor), so ΔW = c · U (K polar(V)), a row block at a time, stored in `dtype`.
    A wide U (d_out < Σk) goes through `esm_fuse`. -> (d_out, d_in) in `dtype`
    """
    scales = _eigen_scales_of(parts, recipe, torch.float64)
    u = StackedRows.of([p.basis for p in parts], scales)
    d_out, width = u.shape
    if width == 0 or width > d_out:
        out = esm_fuse(parts, recipe, norms, torch.float64, "gram")
        out *= scale
        return out.to(dtype)
    gram = u.gram()
    core, msu = polar_core(gram, d_out)
    pv, msv = polar_gram(_stack_coords(parts, recipe, norms, scales, torch.float64))
    if recipe.magnitude == "energy":
        c = _energy_c(parts, core @ gram @ core, pv)
    else:
        c = recipe.multiplier * msu * msv
    return u.times(core @ pv, c * scale, dtype)


def mean_fuse(deltas: list[Tensor]) -> Tensor:
    """Plain mean of task vectors (biases, norms, anything that is not a 2-D weight)."""
    return torch.stack([d.to(torch.float64) for d in deltas]).mean(0)


def inter_layer_scales(norms: dict[str, float], groups: dict[str, str], power: float = 2.0) -> dict[str, float]:
    """Across-depth factors (||ΔW_l|| / mean over the group)^power.

    norms:  {tensor name: ||ΔW||_F} of the merged updates
    groups: {tensor name: group key}, e.g. the layer type with the block index replaced;
            tensors without a group are left alone.
    With power p the post/pre norm ratio of two layers of one group is their pre ratio^(p+1).
    """
    members: dict[str, list[str]] = {}
    for name, g in groups.items():
        if name in norms:
            members.setdefault(g, []).append(name)
    out: dict[str, float] = {}
    for names in members.values():
        mean = sum(float(norms[n]) for n in names) / len(names)
        for n in names:
            out[n] = (float(norms[n]) / mean) ** power if mean > 0 else 1.0
    return out

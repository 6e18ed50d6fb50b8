"""Whole-tensor statistics streamed over blocks (core.chunks) and the faster kernels of slerp,
model_stock, SCE and DELLA: each against the plain whole-tensor expression it replaces."""

from __future__ import annotations

import pytest
import torch

from esm_ray.core import chunks
from esm_ray.core.chunks import chunks_of, regroup
from esm_ray.core.model_stock import StockStats, model_stock, stock_apply, stock_stats
from esm_ray.core.sce import sce_merge, sce_variance
from esm_ray.core.sparsify import della_keep_probability, magnitude_order, pack_bits, unpack_bits


def _cuts(n: int, g: torch.Generator) -> list[tuple[int, int]]:
    cuts = sorted(set(torch.randint(1, n, (5,), generator=g).tolist())) + [n]
    return list(zip([0] + cuts[:-1], cuts))


@pytest.mark.parametrize("seed", range(3))
def test_regroup_gives_the_grid_of_the_whole_whatever_the_blocks(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(1003, generator=g), torch.randn(1003, generator=g)
    whole = list(chunks_of([a, b], 64))
    streamed = list(regroup(([a[s:e], b[s:e]] for s, e in _cuts(1003, g)), 64))
    assert [c[0].numel() for c in whole] == [64] * 15 + [43]
    assert len(whole) == len(streamed)
    assert all(torch.equal(x, y) for cw, cs in zip(whole, streamed) for x, y in zip(cw, cs))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [2, 3, 5])
def test_stock_stats_streamed_have_the_bits_of_the_plain_task_vectors(seed, n, monkeypatch):
    """model_stock's norms and dots fed as pieces of any cutting (τ formed chunk by chunk in
    one reused buffer) are those of the plain expression over the chunks of W_i − W_0, bit for
    bit; its update in place is stock_apply minus the base."""
    monkeypatch.setattr(chunks, "CHUNK", 64)
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1003, generator=g).bfloat16().float()
    ws = [(base + 0.01 * torch.randn(1003, generator=g)).bfloat16().float() for _ in range(n)]
    base[5], ws[0][5] = -0.0, 0.0
    want = stock_stats(chunks_of([w - base for w in ws]))
    acc = StockStats(n, 1003)
    for s, e in _cuts(1003, g):
        acc.add(base[s:e], [w[s:e] for w in ws])
    got = acc.result()
    assert len(got[0]) == n and len(got[1]) == n * (n - 1) // 2
    assert all(torch.equal(x, y) for x, y in zip(got[0] + got[1], want[0] + want[1]))
    t = torch.tensor([0.37])
    plain = stock_apply(t, base, ws) - base
    assert torch.equal(stock_apply(t, base, ws, minus_base=True).view(torch.int32), plain.view(torch.int32))


def test_sce_variance_has_the_bits_of_torch_var():
    g = torch.Generator().manual_seed(0)
    for t in (1, 2, 3, 4, 7):
        for scale in (1e-4, 1.0, 1e3):
            tvs = torch.randn(t, 37, 11, generator=g) * scale + torch.randn(1, 37, 11, generator=g) * scale * 20
            tvs[:, 0] = 0.0
            tvs[0, 1] = -0.0
            want = torch.var(tvs, dim=0, unbiased=False)
            assert torch.equal(sce_variance(tvs).view(torch.int32), want.view(torch.int32))


def test_magnitude_order_is_the_stable_argsort():
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(-4, 5, (50, 33), generator=g) / 2).abs()  # many ties
    x[x == 0] = 0.0
    assert torch.equal(magnitude_order(x), torch.argsort(x, dim=-1, stable=True))
    y = torch.randn(3, 1000, generator=g).abs()
    assert torch.equal(magnitude_order(y), torch.argsort(y, dim=-1, stable=True))


def test_della_keep_probability_is_the_rank_formula():
    """The per-rank table put in place equals ranking every entry (two argsorts) and scaling."""
    def by_ranks(tv, density, epsilon):
        rows = tv.reshape(1, -1) if tv.dim() < 2 else tv
        ranks = torch.argsort(torch.argsort(rows.abs(), dim=-1, stable=True), dim=-1).float() + 1
        lo, hi = ranks.min(dim=-1, keepdim=True).values, ranks.max(dim=-1, keepdim=True).values
        r = torch.nan_to_num((ranks - lo) / (hi - lo), nan=0.0).clamp(0, 1)
        return ((density - epsilon) + r * 2 * epsilon).reshape(tv.shape)

    g = torch.Generator().manual_seed(2)
    for shape in [(7,), (1,), (5, 1), (33, 17), (4, 3, 9), (2, 577)]:
        tv = torch.round(torch.randn(shape, generator=g) * 4) / 4
        for density, epsilon in [(0.5, 0.1), (0.3, 0.2), (0.4, 0.13)]:
            assert torch.equal(della_keep_probability(tv, density, epsilon), by_ranks(tv, density, epsilon))


def test_pack_bits_round_trip():
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 8, 9, 1001):
        keep = torch.rand(n, generator=g) < 0.5
        packed = pack_bits(keep)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
        assert torch.equal(unpack_bits(packed, n), keep)


def test_chunked_statistics_stay_close_to_the_whole_tensor_ones(monkeypatch):
    """Over several chunks the norms, dots and means are reduced chunk by chunk: the results stay
    within float32 rounding of the unchunked expressions (mergekit's, for tensors over 2^20)."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(300, 70, generator=g)
    ws = [base + 0.01 * torch.randn(300, 70, generator=g) for _ in range(3)]
    one = model_stock(base, ws), sce_merge([w - base for w in ws], 0.3)
    monkeypatch.setattr(chunks, "CHUNK", 1000)
    many = model_stock(base, ws), sce_merge([w - base for w in ws], 0.3)
    for x, y in zip(one, many):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def _topk(var: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(var.abs(), k=k, largest=True).indices


def _first_k(var: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest, equal values taken in index order (a stable descending sort)."""
    return torch.sort(var, descending=True, stable=True).indices[:k]


def _mergekit_sce(tvs: list[torch.Tensor], select_topk: float, pick=_topk) -> torch.Tensor:
    """mergekit 0.1.5's sce_merge (less the base), transcribed: torch.var, torch.topk (or `pick`
    of the flat variance), torch.mean."""
    tv = torch.stack(tvs, dim=0)
    if select_topk < 1:
        var = torch.var(tv, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        mask = torch.zeros_like(var)
        if k:
            mask.view(-1)[pick(var.view(-1), k)] = 1
        tv = tv * mask.unsqueeze(0)
    sign = tv.sign()
    elected = (tv.sum(dim=0) >= 0).to(tv.dtype) * 2 - 1
    weights = torch.mean(tv ** 2, dim=list(range(1, tv.dim())))
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    ce = weights.view(-1, *([1] * (tv.dim() - 1))) * (sign == elected)
    return (tv * ce).sum(dim=0) / torch.sum(ce, dim=0).clamp(min=1e-6)


@pytest.mark.parametrize("select_topk", [0.3, 0.5, 0.77])
def test_sce_keeps_topks_entries_among_equal_variances(select_topk):
    """bfloat16 experts give few distinct variances: many equal ones at the threshold. With
    select_ties "topk" SCE keeps those torch.topk keeps on CPU (mergekit's bytes there), with
    the default "index" the lowest indices; the two differ on this data."""
    g = torch.Generator().manual_seed(5)
    tvs = [(torch.randn(64, 48, generator=g) * 0.01).to(torch.bfloat16).float() for _ in range(3)]
    tvs = [torch.round(t * 400) / 400 for t in tvs]  # a handful of values: ties everywhere
    topk = sce_merge(tvs, select_topk, "topk")
    assert torch.equal(topk, _mergekit_sce(tvs, select_topk))
    index = sce_merge(tvs, select_topk)
    assert torch.equal(index, _mergekit_sce(tvs, select_topk, pick=_first_k))
    assert not torch.equal(index, topk)

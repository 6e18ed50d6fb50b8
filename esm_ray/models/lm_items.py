"""Per-item log-likelihoods of a causal LM, with lm-evaluation-harness's conventions, and
bootstrap intervals over items.

- rolling (perplexity): the text's tokens (no special tokens) after one prefix token (the BOS
  token, else EOS), every token scored: item = (log-likelihood, words, bytes);
  word perplexity = exp(-sum ll / sum words), as lm-eval's `word_perplexity`.
- choices (multiple choice): for each answer, the summed log-probability of the tokens of
  " " + answer after the prompt, split as lm-eval splits a (context, continuation) pair
  (encode the whole, the continuation is what the context's encoding does not cover);
  correct = the true answer has the highest log-likelihood (lm-eval's `acc`).

The zoo records these for the base and the experts, and `esm-ray eval` recomputes them with
lm-eval; tests check that the two agree.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch


def prefix_token_id(tokenizer) -> int:
    """The token lm-eval's HF model puts before a rolling text: BOS if the tokenizer has one, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval forms them: trailing spaces of the context move
    to the continuation; the continuation is the part of the whole's encoding after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.no_grad()
def _sum_logprobs(model, seqs: Sequence[tuple[list[int], int]], batch_size: int, pad_id: int) -> list[float]:
    """For each (ids, k): the summed log-probability of the last k ids given those before them."""
    out: list[float] = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (seq, _) in enumerate(chunk):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for i, (seq, k) in enumerate(chunk):
            n = len(seq)
            pos = torch.arange(n - k - 1, n - 1)
            out.append(float(logp[i, pos, torch.tensor(seq[n - k:])].sum()))
    return out


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def rolling_items(model, tokenizer, texts: Sequence[str], batch_size: int = 8) -> list[dict]:
    """[{"ll", "tokens", "words", "bytes"}] for each text (one window: texts are short)."""
    pre = prefix_token_id(tokenizer)
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    lls = _sum_logprobs(model, [([pre, *ids], len(ids)) for ids in enc], batch_size, _pad_id(tokenizer))
    return [{"ll": ll, "tokens": len(ids), "words": len(re.split(r"\s+", t)), "bytes": len(t.encode("utf-8"))}
            for ll, ids, t in zip(lls, enc, texts)]


def choice_items(model, tokenizer, prompts: Sequence[str], choices: Sequence[str], labels: Sequence[int],
                 batch_size: int = 16) -> list[dict]:
    """[{"lls": [per choice], "label", "correct"}] for each prompt (answers " " + choice)."""
    seqs = []
    for p in prompts:
        for c in choices:
            ctx, cont = encode_pair(tokenizer, p, " " + c)
            seqs.append((ctx + cont, len(cont)))
    lls = _sum_logprobs(model, seqs, batch_size, _pad_id(tokenizer))
    k = len(choices)
    out = []
    for i, y in enumerate(labels):
        row = lls[i * k:(i + 1) * k]
        out.append({"lls": row, "label": int(y), "correct": float(max(range(k), key=row.__getitem__) == int(y))})
    return out


def word_perplexity(items: Sequence[dict]) -> float:
    return math.exp(-sum(i["ll"] for i in items) / max(sum(i["words"] for i in items), 1))


def token_perplexity(items: Sequence[dict]) -> float:
    return math.exp(-sum(i["ll"] for i in items) / max(sum(i["tokens"] for i in items), 1))


def accuracy(items: Sequence[dict]) -> float:
    return sum(i["correct"] for i in items) / max(len(items), 1)


def _resampled(items: Sequence[dict], kind: str, idx):
    """The score of each resample (rows of the index array idx) of the items."""
    import numpy as np

    if kind == "perplexity":
        ll = np.array([i["ll"] for i in items])
        w = np.array([i["words"] for i in items], dtype=float)
        return np.exp(-ll[idx].sum(1) / w[idx].sum(1))
    if kind == "accuracy":
        return np.array([i["correct"] for i in items], dtype=float)[idx].mean(1)
    raise ValueError(f"unknown score kind {kind!r}")


def bootstrap_interval(items: Sequence[dict], kind: str, iters: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the score over `iters` resamples of the items (with replacement):
    word perplexity (ratio of sums) for kind "perplexity", mean correctness for "accuracy"."""
    return mean_interval([items], kind, iters, seed, level)


def mean_interval(groups: Sequence[Sequence[dict]], kind: str, iters: int = 1000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over groups (e.g. tasks) of each group's score, every group
    resampled on its own, `iters` times; one group gives `bootstrap_interval`."""
    import numpy as np

    if not groups or any(len(g) == 0 for g in groups):
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    stats = np.zeros(iters)
    for g in groups:
        stats += _resampled(g, kind, rng.integers(0, len(g), size=(iters, len(g))))
    stats /= len(groups)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def score(items: Sequence[dict], kind: str) -> float:
    return word_perplexity(items) if kind == "perplexity" else accuracy(items)

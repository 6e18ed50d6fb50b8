"""Per-item log-likelihoods of a causal LM, with lm-evaluation-harness's conventions, and
bootstrap intervals over items.

- rolling (perplexity): the text's tokens (no special tokens) after one prefix token (the BOS
  token, else EOS), every token scored: item = (log-likelihood, words, bytes);
  word perplexity = exp(-sum ll / sum words), as lm-eval's `word_perplexity`.
- choices (multiple choice): for each answer, the summed log-probability of the tokens of
  " " + answer after the prompt, split as lm-eval splits a (context, continuation) pair
  (encode the whole, the continuation is what the context's encoding does not cover);
  correct = the true answer has the highest log-likelihood (lm-eval's `acc`).

Each prompt of a multiple-choice item runs once and its choices continue from its key/value
cache; sequences run in batches of similar length; the LM head runs only on scored positions.
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


def _head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of hidden states [N, H] (the LM head only on these rows):
    logit of the target minus the logsumexp over the vocabulary, in float32."""
    logits = model.get_output_embeddings()(hidden).float()
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, -1)


def _decoder(model):
    """The decoder stack under the LM head (hidden states before the head)."""
    return model.get_decoder()


def _cache_kwarg(decoder) -> str:
    """The name under which the decoder takes a key/value cache ("cache" in newer transformers)."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _padded(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def _by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (longest first), so little is spent on padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def _sum_logprobs(model, seqs: Sequence[tuple[list[int], int]], batch_size: int, pad_id: int) -> list[float]:
    """For each (ids, k): the summed log-probability of the last k ids given those before them.
    Sequences run in batches of similar length; the LM head runs only on the scored positions."""
    out = [0.0] * len(seqs)
    for chunk in _by_length([len(s) for s, _ in seqs], batch_size):
        ids, mask = _padded([seqs[i][0] for i in chunk], pad_id)
        hidden = _decoder(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        rows, pos, tgt = [], [], []
        for r, i in enumerate(chunk):
            seq, k = seqs[i]
            n = len(seq)
            rows += [r] * k
            pos += range(n - k - 1, n - 1)
            tgt += seq[n - k:]
        r_idx = torch.tensor(rows, dtype=torch.long)
        lp = _head_logprobs(model, hidden[r_idx, torch.tensor(pos, dtype=torch.long)], torch.tensor(tgt, dtype=torch.long))
        sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, r_idx, lp.double())
        for r, i in enumerate(chunk):
            out[i] = float(sums[r])
    return out


@torch.no_grad()
def _choice_logprobs(model, contexts: Sequence[list[int]], conts: Sequence[Sequence[list[int]]], batch_size: int,
                     pad_id: int) -> list[list[float]]:
    """For each context and each of its continuations: the summed log-probability of the
    continuation's ids after the context's. Each context runs once (right-padded, in batches of
    similar length); the continuations then run from its key/value cache, every choice of a
    context as its own row, and the LM head runs only on the scored positions."""
    out: list[list[float]] = [[0.0] * len(c) for c in conts]
    for chunk in _by_length([len(c) for c in contexts], batch_size):
        ids, mask = _padded([contexts[i] for i in chunk], pad_id)
        res = _decoder(model)(input_ids=ids, attention_mask=mask, use_cache=True)
        last = res.last_hidden_state[torch.arange(len(chunk)), mask.sum(1) - 1]
        first = torch.log_softmax(model.get_output_embeddings()(last).float(), -1)  # [B, V]
        rows = [(r, j) for r, i in enumerate(chunk) for j in range(len(conts[i]))]
        for r, j in rows:
            out[chunk[r]][j] = float(first[r, conts[chunk[r]][j][0]])
        longer = [(r, j) for r, j in rows if len(conts[chunk[r]][j]) > 1]
        if not longer:
            continue
        # every later continuation token, predicted from the cache of its context
        cache = res.past_key_values
        cache.reorder_cache(torch.tensor([r for r, _ in longer]))
        tails = [conts[chunk[r]][j][:-1] for r, j in longer]
        tids, tmask = _padded(tails, pad_id)
        lens = mask.sum(1)[[r for r, _ in longer]]
        pos = lens[:, None] + torch.arange(tids.shape[1])[None, :]
        full = torch.cat([mask[[r for r, _ in longer]], torch.ones_like(tmask)], 1)
        dec = _decoder(model)
        hidden = dec(input_ids=tids, attention_mask=full, position_ids=pos, use_cache=True,
                     **{_cache_kwarg(dec): cache}).last_hidden_state
        hr, hp, tgt = [], [], []
        for q, (r, j) in enumerate(longer):
            c = conts[chunk[r]][j]
            hr += [q] * (len(c) - 1)
            hp += range(len(c) - 1)
            tgt += c[1:]
        lp = _head_logprobs(model, hidden[torch.tensor(hr), torch.tensor(hp)], torch.tensor(tgt, dtype=torch.long))
        sums = torch.zeros(len(longer), dtype=torch.float64).index_add_(0, torch.tensor(hr), lp.double())
        for q, (r, j) in enumerate(longer):
            out[chunk[r]][j] += float(sums[q])
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
    """[{"lls": [per choice], "label", "correct"}] for each prompt (answers " " + choice); each
    prompt runs once and its choices continue from its key/value cache."""
    contexts, conts = [], []
    for p in prompts:
        pairs = [encode_pair(tokenizer, p, " " + c) for c in choices]
        if any(ctx != pairs[0][0] for ctx, _ in pairs):  # cannot happen with encode_pair; kept exact anyway
            raise ValueError(f"prompt {p[:40]!r}: its choices split it into different context tokens")
        contexts.append(pairs[0][0])
        conts.append([cont for _, cont in pairs])
    lls = [ll for row in _choice_logprobs(model, contexts, conts, batch_size, _pad_id(tokenizer)) for ll in row]
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

"""One batched decoding loop for sequences that each bring their own adapter and sampling.

The batch is left-padded and prefilled in one forward pass, then decoded one token per step with
the KV cache; position ids come from the attention mask, so a padded row sees the positions it
would see alone. Requests for different tasks share every forward pass: the caller passes a
model that applies each row's adapter itself (esm_ray.routed.multi_lora's stacked adapters), or
`mixed=True` chooses them per row with peft's mixed-adapter batch (`adapter_names=`, "__base__"
for the merged model).
Each row samples with its own temperature, top_p and torch.Generator (seeded per row), so a
row's tokens do not depend on the other rows in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from esm_ray.models.text import pad_batch

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class Row:
    """One sequence to generate. on_token(tok) returns a finish reason to stop the row early
    (a stop string, a client that went away) or None to go on; on_finish(reason) is called once."""

    ids: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    on_token: Callable[[int], str | None] = lambda _: None
    on_finish: Callable[[str], None] = lambda _: None
    generated: int = field(default=0, init=False)


def choose(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Next token from one row's logits: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = (p.cumsum(0) - p) < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, idx, p * keep)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def _cache_name(model: torch.nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by (`cache` in newer transformers)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(inner, "forward")
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_of(out) -> object:
    return out["cache"] if "cache" in out else out["past_key_values"]


@torch.inference_mode()
def decode(model: torch.nn.Module, rows: list[Row], *, pad_id: int, eos_ids: set[int], mixed: bool,
           device: str = "cpu") -> None:
    """Generate every row to its end (EOS, a stop from on_token, or max_tokens)."""
    b = len(rows)
    ids, mask = pad_batch([r.ids for r in rows], pad_id, side="left")
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"adapter_names": [r.adapter or BASE for r in rows]} if mixed else {}
    gens = []
    for r in rows:
        g = torch.Generator()
        g.manual_seed(r.seed) if r.seed is not None else g.seed()
        gens.append(g)
    cache_kw = _cache_name(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
    past, logits = _cache_of(out), out.logits[:, -1, :].float().cpu()
    alive = [r.max_tokens > 0 for r in rows]
    for i, r in enumerate(rows):
        if not alive[i]:
            r.on_finish("length")
    while any(alive):
        nxt = torch.full((b,), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            if not alive[i]:
                continue
            tok = choose(logits[i], r.temperature, r.top_p, gens[i])
            nxt[i] = tok
            if tok in eos_ids:
                alive[i] = False
                r.on_finish("stop")
                continue
            r.generated += 1
            reason = r.on_token(tok)
            if reason is None and r.generated >= r.max_tokens:
                reason = "length"
            if reason is not None:
                alive[i] = False
                r.on_finish(reason)
        if not any(alive):
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None].to(device), attention_mask=mask, position_ids=pos,
                    use_cache=True, **{cache_kw: past}, **extra)
        past, logits = _cache_of(out), out.logits[:, -1, :].float().cpu()


__all__ = ["BASE", "Row", "choose", "decode"]

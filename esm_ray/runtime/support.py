"""What the runtime reads on an expert's side for a method's support stage (routed methods): the
task head, for SiM pooled features of the pretrained backbone on the expert's rows, for
prototypes of the base the base's mean layer inputs on them, and for a causal LM's likelihood
router the expert's log-likelihood gain over the base on them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import Tensor

from esm_ray.core.routing import mean_token_loglik
from esm_ray.errors import InputError
from esm_ray.models.blocks import BlockModel, layerwise_blocks
from esm_ray.models.features import pooled_features
from esm_ray.models.hf import StoredModel, base_model
from esm_ray.models.text import encode_rows, forward_kwargs, make_batches
from esm_ray.spec import MergeSpec
from esm_ray.stats.data import load_calibration_rows
from esm_ray.stats.layerwise import calibrate_layerwise


def _support_ids(spec: MergeSpec, index: int, samples: int, what: str) -> tuple[list[list[int]], int]:
    """Token ids of expert `index`'s first `samples` rows, drawn like calibration rows (same file,
    seed and max_length; text rows tokenized with the base's tokenizer), and the pad id."""
    expert = spec.experts[index]
    if not expert.data:
        raise InputError(f"expert {expert.name!r}: {what} needs rows of the expert's task (`data`)")
    rows = load_calibration_rows(expert.data, samples, spec.calibration.seed)
    tokenizer = None
    with tempfile.TemporaryDirectory(prefix="esm-ray-support-") as tmp:
        if any("input_ids" not in r for r in rows):
            tok_dir = StoredModel(spec.base, spec.s3).tokenizer_dir(Path(tmp))
            if tok_dir is None:
                raise InputError(f"{expert.data}: rows are text but the base {spec.base} has no tokenizer")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        ids = encode_rows(rows, tokenizer, spec.calibration.max_length)
    pad = getattr(tokenizer, "pad_token_id", None)
    return ids, pad if isinstance(pad, int) and pad >= 0 else 0


def support_features(spec: MergeSpec, index: int, samples: int, batch_size: int = 16,
                     adapters_only: bool = False) -> Tensor:
    """Pooled pretrained-backbone features (n, d) of expert `index`'s first `samples` rows.
    Where calibration runs layer-wise (`calibration.mode: layerwise`, or `auto` when every expert
    is a LoRA adapter, `adapters_only`: models.blocks.layerwise_blocks) the base is run one block
    at a time too (stats.layerwise), so the support stage never holds the whole model either."""
    ids, pad = _support_ids(spec, index, samples, "SiM")
    batches = list(make_batches(ids, batch_size, pad))
    base = StoredModel(spec.base, spec.s3)
    try:
        if layerwise_blocks(spec.calibration.mode, adapters_only, base.config, base.reader.keys(), spec.base):
            pooled: list[Tensor] = []
            with torch.inference_mode():
                calibrate_layerwise(BlockModel(base, torch.float32, torch.device("cpu")), batches, modules=[],
                                    pooled=pooled)
            return torch.cat(pooled).float()
        model = base.load(torch.float32, "cpu")
        feats = [pooled_features(model, b_ids, b_mask) for b_ids, b_mask in batches]
        return torch.cat(feats).float()
    finally:
        base.close()


@torch.no_grad()
def base_input_means(spec: MergeSpec, index: int, batch_size: int = 8) -> dict[str, Tensor]:
    """The pretrained base's mean input of every linear layer over expert `index`'s calibration
    rows (the same draw: `calibration.samples`, seed and max_length), averaged over non-padding
    token rows as calibration's s1 / n is: {checkpoint module name: (d_in,) float32}. With
    `residual_of: base` these are the inputs the prototype router's pass sees, so they are the
    prototypes that match it (ESM++'s `prototypes: base`)."""
    from esm_ray.stats.calibrate import _checkpoint_names
    from esm_ray.stats.hooks import in_features, linear_modules

    ids, pad = _support_ids(spec, index, spec.calibration.samples, "the base's prototypes")
    base = StoredModel(spec.base, spec.s3)
    try:
        model = base.load(torch.float32, "cpu")
        mods = linear_modules(model)
        names = _checkpoint_names(model, list(mods), set(base.reader.keys()))
    finally:
        base.close()
    s1 = {n: torch.zeros(in_features(m), dtype=torch.float64) for n, m in mods.items()}
    count = dict.fromkeys(mods, 0)
    mask: Tensor | None = None

    def hook(name: str):
        def pre(_mod: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            if x.ndim == 3 and mask is not None and mask.shape == x.shape[:2]:  # token rows, padding out
                x = x[mask.to(torch.bool)]
            x = x.reshape(-1, x.shape[-1])
            s1[name] += x.sum(0)
            count[name] += x.shape[0]
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    run = base_model(model) or model  # a causal LM's decoder: its head's input is not a routed layer
    try:
        for b_ids, b_mask in make_batches(ids, batch_size, pad):
            mask = b_mask
            run(input_ids=b_ids, attention_mask=b_mask, **forward_kwargs(run))
    finally:
        for h in handles:
            h.remove()
    del model
    return {names[n]: (s1[n] / max(count[n], 1)).float() for n in mods if count[n]}


@torch.no_grad()
def likelihood_gain(spec: MergeSpec, index: int, samples: int, batch_size: int = 8) -> float:
    """How much better expert `index` models its own task's text than the base: the mean over
    its first `samples` rows of each row's mean next-token log-likelihood under the expert minus
    under the base (nats per token; a LoRA adapter is applied to the base). Positive for an
    expert trained on its text; negative for one trained on answers only that lost the prompts."""
    ids, pad = _support_ids(spec, index, samples, "the likelihood router")
    total = torch.zeros(len(ids), dtype=torch.float64)
    for sign, src in ((-1.0, StoredModel(spec.base, spec.s3)),
                      (1.0, StoredModel(spec.experts[index].model, spec.s3, spec.base))):
        model, at = src.load(torch.float32, "cpu"), 0
        for b_ids, b_mask in make_batches(ids, batch_size, pad):
            ll = mean_token_loglik(model(input_ids=b_ids, attention_mask=b_mask).logits, b_ids, b_mask)
            total[at:at + len(ll)] += sign * ll.double()
            at += len(ll)
        del model
    return float(total.mean())

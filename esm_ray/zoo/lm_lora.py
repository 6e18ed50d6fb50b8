"""The LoRA LM zoo (`esm-ray zoo lm --lora`): each expert a PEFT LoRA adapter on the zoo's base.

Same columns, data, splits, seeds, steps and batches as the full-finetune LM zoo; only the
expert changes: rank-r LoRA factors (peft's `LoraConfig`, default r = 16, lora_alpha = 32, no
dropout) on the attention and MLP linears of every decoder block (q, k, v, o, gate, up, down),
trained in float32 at LoRA's own learning rate, with everything else frozen. An expert
directory holds what `PeftModel.save_pretrained` writes (`adapter_config.json`,
`adapter_model.safetensors` in float32) with `base_model_name_or_path` = `../../base` (the
zoo's base, relative to the adapter), plus the zoo's `manifest.json` and `scores.json`. The
expert is scored as the base with its adapter merged in float32 (W0 + s·B·A: what esm-ray
reads from the adapter, `io.adapter.AdapterModel`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from esm_ray.errors import InputError
from esm_ray.zoo.lm_train import Example, LMTrainConfig, train_lm

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_REF = "../../base"  # base_model_name_or_path of an expert: the zoo's base, from experts/<column>/


@dataclass(frozen=True)
class LoraSettings:
    """How the LoRA zoo's experts are made. lr replaces the full zoo's learning rate (steps,
    batch size and warm-up stay the zoo's): LoRA's factors want a higher rate than full fine-tuning."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    lr: float = 2e-3
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InputError(f"LoRA zoo: rank must be >= 1, got {self.rank}")
        if self.alpha <= 0 or self.lr <= 0:
            raise InputError(f"LoRA zoo: lora_alpha and lr must be > 0, got {self.alpha} and {self.lr}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"LoRA zoo: dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    def train_config(self, cfg: LMTrainConfig) -> LMTrainConfig:
        return cfg.scaled(lr=self.lr)


def peft_config(lora: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                      target_modules=list(lora.targets), task_type="CAUSAL_LM")


def train_adapter(base, examples: list[Example], tcfg: LMTrainConfig, lora: LoraSettings, seed: int, pad_id: int,
                  out: Path, on_step: Callable[[int, int, float], None] | None = None) -> tuple[dict, torch.nn.Module]:
    """Train a LoRA adapter on a copy of `base` (float32; `base` is left untouched), write it to
    `out` as peft does (base_model_name_or_path = BASE_REF), and return (training stats, the
    base with the adapter merged in float32: the model the expert is scored as)."""
    from peft import get_peft_model

    torch.manual_seed(seed)  # the factors' initialisation (A random, B zero)
    model = get_peft_model(copy.deepcopy(base), peft_config(lora))
    params = [p for p in model.parameters() if p.requires_grad]
    stats = train_lm(model.get_base_model(), examples, lora.train_config(tcfg), seed, pad_id, on_step=on_step,
                     params=params)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # peft's model-card stub
    cfg = json.loads((out / "adapter_config.json").read_text())
    if cfg.get("base_model_name_or_path") != BASE_REF:
        cfg["base_model_name_or_path"] = BASE_REF
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    merged = model.merge_and_unload().eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return stats, merged


def adapter_vector_stats(base_dir: Path, expert_dirs: dict[str, Path]) -> dict:
    """Each adapter's task-vector norm (its densified updates s·B·A over every LoRA target,
    float64) and the pairwise cosines, from the factors as esm-ray reads them
    (`io.adapter.AdapterModel.factors`): <s_i B_i A_i, s_j B_j A_j> = s_i s_j Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ),
    no d_out x d_in matrix formed."""
    from esm_ray.io.adapter import open_adapter
    from esm_ray.io.reader import open_model

    names = list(expert_dirs)
    models = [open_adapter(str(expert_dirs[n]), open_model(str(base_dir))) for n in names]
    try:
        targets = sorted(set().union(*(m.targets() for m in models)))
        gram = torch.zeros(len(names), len(names), dtype=torch.float64)
        for t in targets:
            fs = [m.factors(t, torch.float64) for m in models]
            for i, fi in enumerate(fs):
                for j in range(i, len(fs)):
                    fj = fs[j]
                    if fi is None or fj is None:
                        continue
                    v = fi[2] * fj[2] * float(((fi[0].T @ fj[0]) * (fi[1] @ fj[1].T)).sum())
                    gram[i, j] += v
                    if i != j:
                        gram[j, i] += v
    finally:
        for m in models:
            m.close()
    norms = gram.diag().sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    return {"norm": {n: float(norms[i]) for i, n in enumerate(names)},
            "cosine": {a: {b: round(float(cos[i, j]), 6) for j, b in enumerate(names)} for i, a in enumerate(names)},
            "tensors": "LoRA targets (" + ", ".join(models[0].lora_config.target_names if models else ())
                       + ") of every decoder block, densified s·B·A"}

"""Task models for the search stage: one expert's map from an unlabelled batch to class logits at
given parameters, per model family.

`register_task_model` keys a factory by the base config's `model_type`. Shipped: BERT encoders
with the zoo's mean-pooling linear head (`head.safetensors` next to each expert), and causal LMs
(the logits of the first generated token over the vocabulary).
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from esm_ray.errors import InputError, SpecError
from esm_ray.models.heads import HEAD_FILE
from esm_ray.models.hf import copy_tokenizer, hf_config, load_into, skip_init
from esm_ray.models.text import pad_batch


class TaskModel(ABC):
    """One expert's map from an unlabelled batch to class logits, at given parameters.

    `module` holds the architecture with the base weights (frozen); `param_names` are its
    parameters as state-dict keys of the checkpoint.
    """

    module: nn.Module
    prefix: str = ""  # checkpoint key = prefix + module parameter name
    pad_id: int = 0
    rows: "_TextRows"  # how rows become token ids (set by the subclass)

    def encode(self, row: dict[str, Any]) -> list[int]:
        """Token ids of one row ({'text'} or {'input_ids'}), truncated."""
        ids = self.rows.encode(row)
        self.pad_id = self.rows.pad_id()
        return ids

    @abstractmethod
    def logits(self, params: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, C] logits with the module's parameters replaced by `params` (module names)."""

    def param_names(self) -> list[str]:
        return [self.prefix + n for n, _ in self.module.named_parameters()]

    def linear_weights(self) -> list[str]:
        return [self.prefix + n + ".weight" for n, m in self.module.named_modules() if isinstance(m, nn.Linear)]

    def collate(self, rows: Sequence[list[int]]) -> tuple[Tensor, Tensor]:
        return pad_batch(rows, self.pad_id)


TaskModelFactory = Callable[["SearchInputs"], TaskModel]
TASK_MODELS: dict[str, TaskModelFactory] = {}


def register_task_model(*model_types: str) -> Callable[[TaskModelFactory], TaskModelFactory]:
    """Decorator: use this factory for base configs whose `model_type` is one of `model_types`.

    The key '*causal-lm' is the fallback for any config whose architectures end in 'ForCausalLM'.
    """
    def deco(fn: TaskModelFactory) -> TaskModelFactory:
        for t in model_types:
            TASK_MODELS[t] = fn
        return fn
    return deco


def task_model_factory(config: dict[str, Any]) -> TaskModelFactory:
    mtype = config.get("model_type", "")
    if mtype in TASK_MODELS:
        return TASK_MODELS[mtype]
    if any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or []):
        return TASK_MODELS["*causal-lm"]
    raise SpecError(f"no task-logit function for model type {mtype!r}; the search methods support "
                    f"{', '.join(sorted(TASK_MODELS))} (add one with register_task_model)")


@dataclass
class SearchInputs:
    """What a TaskModel factory may read: the base and expert readers and their URIs."""

    base: Any
    expert: Any
    base_uri: str
    expert_uri: str
    max_length: int

    def config(self) -> dict[str, Any]:
        cfg = self.base.config
        if not cfg:
            raise InputError(f"{self.base_uri}: no config.json; the search needs the architecture")
        return dict(cfg)

    def hf_config(self):
        return hf_config(self.config(), self.base_uri)

    def tokenizer(self):
        """The base's tokenizer, from its directory (copied into a temporary one when remote)."""
        from transformers import AutoTokenizer

        if Path(self.base_uri).is_dir():
            return AutoTokenizer.from_pretrained(self.base_uri)
        with tempfile.TemporaryDirectory(prefix="esm-ray-tok-") as d:
            found = copy_tokenizer(self.base, self.config(), Path(d))
            if found is None:
                raise InputError(f"{self.base_uri}: rows are text but the base has no tokenizer files")
            return AutoTokenizer.from_pretrained(str(found))

    def load_into(self, module: nn.Module, prefix: str) -> None:
        """Copy the base tensors into `module` (parameters and floating buffers present in both)."""
        load_into(self.base, module, prefix, self.base_uri)


def _prefix(keys: set[str], probe: str, candidates: Sequence[str]) -> str:
    for p in candidates:
        if p + probe in keys:
            return p
    raise InputError(f"cannot find {probe!r} under any of the prefixes {list(candidates)}")


class _TextRows:
    """Tokenize {'text'} rows with a HF tokenizer, pass {'input_ids'} through."""

    def __init__(self, src: SearchInputs) -> None:
        self.src = src
        self._tok = None

    def encode(self, row: dict[str, Any]) -> list[int]:
        if "input_ids" in row:
            return list(row["input_ids"])[: self.src.max_length]
        if self._tok is None:
            self._tok = self.src.tokenizer()
        return self._tok(row["text"], truncation=True, max_length=self.src.max_length)["input_ids"]

    def pad_id(self) -> int:
        tok = self._tok
        return int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0


class BertWithHead(TaskModel):
    """BERT encoder, attention-mask mean pooling, the expert's linear head (`head.safetensors`)."""

    def __init__(self, src: SearchInputs) -> None:
        from safetensors.torch import load as load_st
        from transformers import BertModel

        self.prefix = _prefix(set(src.base.keys()), "embeddings.word_embeddings.weight", ("", "bert."))
        cfg = src.hf_config()
        with skip_init():
            self.module = BertModel(cfg, add_pooling_layer=any(k.startswith(self.prefix + "pooler.")
                                                                for k in src.base.keys()))
        src.load_into(self.module, self.prefix)
        self.module.eval().requires_grad_(False)
        if HEAD_FILE not in set(src.expert.aux_names()):
            raise InputError(f"{src.expert_uri}: no {HEAD_FILE}; the BERT search needs each expert's task head "
                             "(weight [labels, hidden], bias [labels]) to compute its logits")
        head = load_st(src.expert.read_aux(HEAD_FILE))
        if set(head) != {"weight", "bias"} or head["weight"].ndim != 2:
            raise InputError(f"{src.expert_uri}/{HEAD_FILE}: needs exactly 'weight' [labels, hidden] and 'bias'")
        self.head_w, self.head_b = head["weight"].float(), head["bias"].float()
        self.rows = _TextRows(src)

    def logits(self, params: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = functional_call(self.module, params, (), {"input_ids": input_ids, "attention_mask": attention_mask})
        m = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1.0)
        return torch.nn.functional.linear(pooled, self.head_w.to(pooled.device), self.head_b.to(pooled.device))


class CausalLMFirstToken(TaskModel):
    """A causal LM; logits of the first generated token (the position after each prompt's last)."""

    def __init__(self, src: SearchInputs) -> None:
        from transformers import AutoModelForCausalLM

        keys = set(src.base.keys())
        with skip_init():
            self.module = AutoModelForCausalLM.from_config(src.hf_config())
        names = [n for n, _ in self.module.named_parameters()]
        self.prefix = ""
        if names and names[0] not in keys:
            raise InputError(f"{src.base_uri}: tensor {names[0]!r} is missing (not a causal-LM checkpoint?)")
        src.load_into(self.module, "")
        self.module.eval().requires_grad_(False)
        self.rows = _TextRows(src)

    def logits(self, params: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = functional_call(self.module, params, (), {"input_ids": input_ids, "attention_mask": attention_mask})
        last = attention_mask.sum(1) - 1  # right padding
        return out.logits[torch.arange(input_ids.shape[0]), last]


register_task_model("bert")(BertWithHead)
register_task_model("*causal-lm", "llama", "mistral", "qwen2", "gpt2")(CausalLMFirstToken)


__all__ = ["BertWithHead", "CausalLMFirstToken", "SearchInputs", "TASK_MODELS", "TaskModel", "register_task_model",
           "task_model_factory"]

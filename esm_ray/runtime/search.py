"""The search stage: learn a Concrete mask and/or merge coefficients by entropy minimisation.

Who does what in one step:

    coordinator                                   expert side i (in-process or a Ray actor)
    -----------                                   -----------------------------------------
    holds logits ℓ, coefficients λ, Adam states
    samples m̃ (seeded), builds θ(ℓ, λ) with autograd
    sends θ (one dict, the same for every expert) ──>  batch of its task's unlabelled rows
                                                       (seeded by step and expert index),
                                                       H_i = entropy(logits_i(θ; batch)),
                                   <── (H_i, ∂H_i/∂θ)   via functional_call on its frozen copy
    G = Σ_i ∂H_i/∂θ (expert order)                      of the architecture and its own head
    backward(θ, G) -> ∂L/∂ℓ, ∂L/∂λ (the merge formula)
    Adam step

Shipping ∂H_i/∂θ (one model-size dict per expert) is the cheapest exact choice: the
gradients w.r.t. the mask and the coefficients need the task vectors of every task, which
only the coordinator has together. The coordinator therefore holds, for the searched tensors,
θ₀ and either the fixed weighted sum Σ w_i τ_i (Concrete TA: one model size) or the T task
vectors (learned coefficients), plus the logits, their gradient and two Adam moments.
θ and the gradients travel as float32 numpy arrays, which Ray passes between processes on one
node without copies (RayPool puts θ in the object store once for all experts).

The task-specific "unlabelled batch → logits" map is pluggable: `register_task_model` keys a
factory by the base config's `model_type`. Shipped: BERT encoders with the zoo's mean-pooling
linear head (`head.safetensors` next to each expert), and causal LMs (entropy of the first
generated token over the vocabulary).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from esm_ray.core.adamerging import entropy, init_coefficients, project_
from esm_ray.core.concrete import ConcreteMask, normalize_masks
from esm_ray.core.merged_model import merge_params
from esm_ray.errors import InputError, SpecError
from esm_ray.methods.adamerging import SearchConfig, SearchResult
from esm_ray.runtime.device import resolve_device

log = logging.getLogger("esm_ray.search")


# ---- "unlabelled batch -> logits", per model family --------------------------------------------

class TaskModel(ABC):
    """One expert's map from an unlabelled batch to class logits, at given parameters.

    `module` holds the architecture with the base weights (frozen); `param_names` are its
    parameters as state-dict keys of the checkpoint.
    """

    module: nn.Module
    prefix: str = ""  # checkpoint key = prefix + module parameter name
    pad_id: int = 0

    @abstractmethod
    def encode(self, row: dict[str, Any]) -> list[int]:
        """Token ids of one row ({'text'} or {'input_ids'}), truncated."""

    @abstractmethod
    def logits(self, params: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, C] logits with the module's parameters replaced by `params` (module names)."""

    def param_names(self) -> list[str]:
        return [self.prefix + n for n, _ in self.module.named_parameters()]

    def linear_weights(self) -> list[str]:
        return [self.prefix + n + ".weight" for n, m in self.module.named_modules() if isinstance(m, nn.Linear)]

    def collate(self, rows: Sequence[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids, mask


TaskModelFactory = Callable[["ModelSource"], TaskModel]
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
class ModelSource:
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
        from transformers import AutoConfig

        cfg = self.config()
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    def tokenizer(self):
        """The base's tokenizer, from its directory (copied into a temporary one when remote)."""
        from transformers import AutoTokenizer

        if Path(self.base_uri).is_dir():
            return AutoTokenizer.from_pretrained(self.base_uri)
        with tempfile.TemporaryDirectory(prefix="esm-ray-tok-") as d:
            for name in self.base.aux_names():
                if name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "spiece")):
                    (Path(d) / name).write_bytes(self.base.read_aux(name))
            (Path(d) / "config.json").write_bytes(self.base.read_aux("config.json"))
            return AutoTokenizer.from_pretrained(d)

    def load_into(self, module: nn.Module, prefix: str) -> None:
        """Copy the base tensors into `module` (parameters and floating buffers present in both)."""
        keys = set(self.base.keys())
        with torch.no_grad():
            for n, t in list(module.named_parameters()) + list(module.named_buffers()):
                if prefix + n in keys:
                    t.copy_(self.base.get(prefix + n).to(t.dtype))
                elif isinstance(t, nn.Parameter):
                    raise InputError(f"{self.base_uri}: tensor {prefix + n!r} is missing")


def _skip_init():
    """Build a transformers module without random initialisation (its weights are loaded next)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _prefix(keys: set[str], probe: str, candidates: Sequence[str]) -> str:
    for p in candidates:
        if p + probe in keys:
            return p
    raise InputError(f"cannot find {probe!r} under any of the prefixes {list(candidates)}")


class _TextRows:
    """Tokenize {'text'} rows with a HF tokenizer, pass {'input_ids'} through."""

    def __init__(self, src: ModelSource) -> None:
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


HEAD_FILE = "head.safetensors"


class BertWithHead(TaskModel):
    """BERT encoder, attention-mask mean pooling, the expert's linear head (`head.safetensors`)."""

    def __init__(self, src: ModelSource) -> None:
        from safetensors.torch import load as load_st
        from transformers import BertModel

        self.prefix = _prefix(set(src.base.keys()), "embeddings.word_embeddings.weight", ("", "bert."))
        cfg = src.hf_config()
        with _skip_init():
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

    def encode(self, row: dict[str, Any]) -> list[int]:
        ids = self.rows.encode(row)
        self.pad_id = self.rows.pad_id()
        return ids

    def logits(self, params: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = functional_call(self.module, params, (), {"input_ids": input_ids, "attention_mask": attention_mask})
        m = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1.0)
        return torch.nn.functional.linear(pooled, self.head_w.to(pooled.device), self.head_b.to(pooled.device))


class CausalLMFirstToken(TaskModel):
    """A causal LM; logits of the first generated token (the position after each prompt's last)."""

    def __init__(self, src: ModelSource) -> None:
        from transformers import AutoModelForCausalLM

        keys = set(src.base.keys())
        with _skip_init():
            self.module = AutoModelForCausalLM.from_config(src.hf_config())
        names = [n for n, _ in self.module.named_parameters()]
        self.prefix = ""
        if names and names[0] not in keys:
            raise InputError(f"{src.base_uri}: tensor {names[0]!r} is missing (not a causal-LM checkpoint?)")
        src.load_into(self.module, "")
        self.module.eval().requires_grad_(False)
        self.rows = _TextRows(src)

    def encode(self, row: dict[str, Any]) -> list[int]:
        ids = self.rows.encode(row)
        self.pad_id = self.rows.pad_id()
        return ids

    def logits(self, params: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = functional_call(self.module, params, (), {"input_ids": input_ids, "attention_mask": attention_mask})
        last = attention_mask.sum(1) - 1  # right padding
        return out.logits[torch.arange(input_ids.shape[0]), last]


register_task_model("bert")(BertWithHead)
register_task_model("*causal-lm", "llama", "mistral", "qwen2", "gpt2")(CausalLMFirstToken)


# ---- expert side -------------------------------------------------------------------------------

def as_tensor(x: Any) -> Tensor:
    """A tensor view of a tensor or a (possibly read-only, shared-memory) numpy array."""
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(x)
    return torch.as_tensor(x)


def as_array(t: Tensor) -> np.ndarray:
    return t.detach().float().contiguous().cpu().numpy()


def step_seed(seed: int, phase: str, step: int) -> int:
    """The seed of one step's batches (each expert mixes in its own index)."""
    key = f"esm-ray/search\x00{int(seed)}\x00{phase}\x00{int(step)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def _batch_seed(seed: int, index: int) -> int:
    key = f"esm-ray/batch\x00{int(seed)}\x00{int(index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


class TaskSearcher:
    """One expert's side of the search: its task model, its unlabelled rows, its gradients."""

    def __init__(self, spec, index: int, params, base, expert) -> None:
        from esm_ray.stats.data import load_calibration_rows

        e = spec.experts[index]
        if not e.data:
            raise SpecError(f"field `experts.{index}.data`: method {spec.method.name!r} needs unlabelled "
                            f"data for expert {e.name!r}")
        self.index = index
        self.batch_size = int(params.batch_size)
        max_length = int(getattr(params, "max_length", None) or spec.calibration.max_length)
        src = ModelSource(base, expert, spec.base, e.model, max_length)
        self.task = task_model_factory(src.config())(src)
        seed = params.seed if params.seed is not None else spec.seed
        raw = load_calibration_rows(e.data, int(params.samples), int(seed))
        self.rows = [self.task.encode(r) for r in raw]
        if not self.rows:
            raise InputError(f"{e.data}: no rows")
        self.device = resolve_device(spec.runtime.device, f"the process of expert {e.name!r}")
        self.task.module.to(self.device)
        self.fixed: dict[str, Tensor] = {}
        log.info("expert %s: search ready (%d rows, %s)", e.name, len(self.rows), type(self.task).__name__)

    def layout(self) -> dict[str, list[str]]:
        return {"params": self.task.param_names(), "linear": self.task.linear_weights()}

    def begin(self, fixed: dict[str, Any]) -> None:
        """Tensors that stay constant during the search, already merged (by checkpoint name)."""
        self.fixed = {n: as_tensor(t).to(self.device) for n, t in fixed.items()}

    def batch(self, seed: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(_batch_seed(seed, self.index))
        idx = torch.randperm(len(self.rows), generator=g)[: self.batch_size].tolist()
        ids, mask = self.task.collate([self.rows[i] for i in idx])
        return ids.to(self.device), mask.to(self.device)

    def entropy_grad(self, merged: dict[str, Any], seed: int) -> tuple[float, dict[str, np.ndarray]]:
        """(H, ∂H/∂θ) for this task's batch of step `seed` at merged parameters θ.

        θ and the gradients travel as float32 numpy arrays: Ray hands numpy to an actor on the
        same node without a copy (read-only, and never written here), torch tensors it copies.
        """
        p = len(self.task.prefix)
        params = {n[p:]: t for n, t in self.fixed.items()}
        leaves = {}
        for n, t in merged.items():
            leaf = as_tensor(t).to(self.device).detach().requires_grad_()
            leaves[n] = leaf
            params[n[p:]] = leaf
        ids, mask = self.batch(seed)
        with torch.enable_grad():
            loss = entropy(self.task.logits(params, ids, mask).float())
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        out = {n: (g.detach().float().cpu() if g is not None else torch.zeros(leaves[n].shape)).numpy()
               for n, g in zip(leaves, grads)}
        return float(loss.detach()), out


# ---- coordinator -------------------------------------------------------------------------------

def _dense(part: Any) -> Tensor:
    from esm_ray.methods._common import dense

    return dense(part).float()


class _Problem:
    """The coordinator's tensors: θ₀, the task vectors (or their fixed sum) of the searched set."""

    def __init__(self, cfg: SearchConfig, pool, plan, infos, weights: list[float]) -> None:
        from esm_ray.core.arithmetic import weighted_sum
        from esm_ray.io.reader import open_model

        self.cfg, self.pool, self.weights = cfg, pool, weights
        layouts = pool.call("search_layout")
        layout = layouts[0]
        for e, other in enumerate(layouts[1:], 1):
            if other["params"] != layout["params"]:
                raise InputError(f"expert {e}: its architecture's parameters differ from expert 0's")
        params = set(layout["params"])
        by_name = {i.name: i for i in infos}
        self.names = [n for n in plan.names if n in params and n in by_name]
        if not self.names:
            raise InputError("no floating-point parameter of the model is in the checkpoint; nothing to search")
        linear = set(layout["linear"])
        self.masked = ([n for n in self.names if cfg.mask_scope == "all" or (n in linear and len(plan.shapes[n]) == 2)]
                       if cfg.mask else [])
        masked = set(self.masked)
        learn = cfg.coefficients != "fixed"
        self.dynamic = list(self.names) if learn else list(self.masked)
        base = open_model(plan.spec.base, plan.spec.s3)
        try:
            self.base = {n: base.get(n).to(torch.float32) for n in self.names}
        finally:
            base.close()
        # task vectors, streamed in groups: stacked [T, ...] when λ is learned, else Σ w_i τ_i
        self.tv: dict[str, Tensor] = {}
        fixed: dict[str, Tensor] = {}
        group, size = [], 0
        for n in self.names + [None]:  # type: ignore[list-item]
            if n is not None:
                group.append(by_name[n])
                size += by_name[n].numel * 4 * max(1, plan.n_experts)
            if group and (n is None or size > (256 << 20)):
                parts = pool.call("prepare", group)
                for j, info in enumerate(group):
                    tvs = [_dense(parts[e][j]) for e in range(plan.n_experts)]
                    if learn:
                        self.tv[info.name] = torch.stack(tvs)
                    else:
                        s = weighted_sum(tvs, weights).float()
                        if info.name in masked:
                            self.tv[info.name] = s.unsqueeze(0)
                        else:
                            fixed[info.name] = self.base[info.name] + s
                group, size = [], 0
        self.base = {n: self.base[n] for n in self.dynamic}  # the constant ones are merged already
        self.ones = torch.ones(1)
        self.expert_seconds = 0.0  # wall time spent waiting for the experts' gradients
        pool.call("search_begin", {n: as_array(t) for n, t in fixed.items()})
        log.info("search: %d tensors change (%d masked), %d constant", len(self.dynamic), len(self.masked), len(fixed))

    def merge(self, coefs: Tensor | None, masks: dict[str, Tensor] | None) -> dict[str, Tensor]:
        c = self.ones if coefs is None else coefs
        tv = {n: self.tv[n] for n in self.dynamic}
        return merge_params(self.base, tv, c, masks, self.dynamic if c.ndim == 2 else None)

    def grads(self, theta: dict[str, Tensor], seed: int) -> tuple[float, dict[str, Tensor]]:
        """Σ_i H_i and Σ_i ∂H_i/∂θ over the experts, summed in expert order."""
        payload = {n: as_array(t) for n, t in theta.items()}
        t0 = time.perf_counter()
        res = self.pool.call("entropy_grad", payload, seed)
        self.expert_seconds += time.perf_counter() - t0
        loss = float(sum(r[0] for r in res))
        total = {}
        for n in payload:
            acc = as_tensor(res[0][1][n]).clone()
            for r in res[1:]:
                acc += as_tensor(r[1][n])
            total[n] = acc
        return loss, total

    def backward(self, theta: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
        names = [n for n in theta if theta[n].requires_grad]
        if names:
            torch.autograd.backward([theta[n] for n in names], [grads[n] for n in names])


def run_search(method, pool, plan, infos, progress: bool = True) -> SearchResult:
    """Run the method's search on the expert pool; stores and returns the SearchResult."""
    cfg: SearchConfig = method.search_config()
    t = plan.n_experts
    log.info("%s", method.memory_note(plan.shapes))
    weights = [cfg.init_weight * float(e.weight) for e in plan.spec.experts]
    t0 = time.perf_counter()
    prob = _Problem(cfg, pool, plan, infos, weights)
    result = SearchResult(names=list(prob.dynamic), weights=weights)
    total_steps = cfg.steps + (cfg.adamerging_steps if cfg.bilevel else 0)
    bar = tqdm(total=total_steps, desc=f"search {method.name}", unit="step", disable=not progress)
    t_steps = time.perf_counter()

    def record(phase: str, step: int, objective: float) -> None:
        result.history.append({"phase": phase, "step": step, "objective": round(objective, 6)})
        bar.set_postfix(objective=f"{objective:.4f}")
        bar.update(1)

    mask = ConcreteMask({n: prob.base[n].shape for n in prob.masked}, cfg.init_logit, cfg.temperature) \
        if cfg.mask else None
    coefs = None
    if cfg.coefficients != "fixed":
        k = len(prob.dynamic) if cfg.coefficients == "layer" else None
        coefs = init_coefficients(t, k, weights)
    init = coefs.detach().clone() if coefs is not None else None
    try:
        if mask is not None and not cfg.bilevel:
            # Concrete TA (or a mask learned jointly with fixed λ): one outer level
            opt = torch.optim.Adam(mask.parameters(), lr=cfg.lr)
            for step in range(cfg.steps):
                theta = prob.merge(coefs, mask.sample(cfg.seed, step))
                loss, g = prob.grads(theta, step_seed(cfg.seed, "mask", step))
                prob.backward(theta, g)
                opt.step()
                opt.zero_grad(set_to_none=True)
                record("mask", step, loss)
        elif mask is not None:
            _bilevel(cfg, prob, mask, coefs, init, record)
        if coefs is not None:
            final = normalize_masks(mask.final(cfg.final_mask, cfg.seed)) if mask is not None else None
            with torch.no_grad():
                coefs.copy_(init)
            steps = cfg.adamerging_steps if cfg.bilevel else cfg.steps
            lr = cfg.adamerging_lr if cfg.bilevel else cfg.lr
            opt = torch.optim.Adam([coefs], lr=lr)
            for step in range(steps):
                theta = prob.merge(coefs, final)
                loss, g = prob.grads(theta, step_seed(cfg.seed, "coefficients", step))
                prob.backward(theta, g)
                opt.step()
                opt.zero_grad(set_to_none=True)
                project_(coefs, cfg.clamp)
                record("coefficients", step, loss)
    finally:
        bar.close()
        pool.call("search_end")
    n_steps = len(result.history)
    result.steps_run = n_steps
    result.seconds = time.perf_counter() - t0
    result.seconds_per_step = (time.perf_counter() - t_steps) / n_steps if n_steps else 0.0
    result.expert_seconds_per_step = prob.expert_seconds / n_steps if n_steps else 0.0
    if mask is not None:
        result.mask = mask.final(cfg.final_mask, cfg.seed)
    if coefs is not None:
        result.coefficients = coefs.detach().clone()
    method.set_search_result(result)
    return result


def _bilevel(cfg: SearchConfig, prob: _Problem, mask: ConcreteMask, coefs: Tensor, init: Tensor, record) -> None:
    """Concrete AdaMerging, first order: per step reset λ, one inner step on λ, one outer on ℓ."""
    outer = torch.optim.Adam(mask.parameters(), lr=cfg.lr)
    inner = torch.optim.Adam([coefs], lr=cfg.inner_lr)  # its state persists across steps
    prev: tuple[Tensor, dict[str, Tensor]] | None = None
    for step in range(cfg.steps):
        m = mask.sample(cfg.seed, step)
        with torch.no_grad():
            coefs.copy_(init)
        # inner: ∂L/∂λ with the mask detached, at the reset λ (or, reproducing the published
        # code, at the previous step's merge), applied to the reset λ
        at, at_mask = (prev if (cfg.stale_inner_grad and prev is not None)
                       else (coefs.detach(), {n: v.detach() for n, v in m.items()}))
        leaf = at.clone().requires_grad_()
        theta = prob.merge(leaf, at_mask)
        loss_in, g = prob.grads(theta, step_seed(cfg.seed, "inner", step))
        prob.backward(theta, g)
        coefs.grad = leaf.grad
        inner.step()
        inner.zero_grad(set_to_none=True)
        project_(coefs, cfg.clamp)
        # outer: re-merge with the updated λ (fixed) and the live mask, fresh batches
        theta = prob.merge(coefs.detach(), m)
        loss, g = prob.grads(theta, step_seed(cfg.seed, "outer", step))
        prob.backward(theta, g)
        outer.step()
        outer.zero_grad(set_to_none=True)
        prev = (coefs.detach().clone(), {n: v.detach() for n, v in m.items()})
        record("mask", step, loss)


__all__ = [
    "BertWithHead",
    "CausalLMFirstToken",
    "ModelSource",
    "TASK_MODELS",
    "TaskModel",
    "TaskSearcher",
    "register_task_model",
    "run_search",
    "step_seed",
    "task_model_factory",
]

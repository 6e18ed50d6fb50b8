"""The routed model: a Hugging Face encoder (or decoder) whose routed linears carry T low-rank
residual experts, a router that picks one per sample, and optional task heads.

Routers:
- "prototype": ESM++; each routed layer picks per sample by cosine to its prototypes
- "sim":       SiM; one pass of the pretrained backbone gives a pooled feature per sample, the
               task subspaces pick one task, every routed layer uses that task's expert
- "oracle":    the caller names each sample's task
- "none":      merged weights only (the static model)
A sample may also carry a task of its own (`task_ids` ≥ 0) that overrides the router for it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from esm_ray.core.routing import sim_route, token_mean, vote
from esm_ray.models.features import last_hidden, pooled_features
from esm_ray.routed.format import ROUTER_KINDS
from esm_ray.models.text import forward_kwargs
from esm_ray.routed.layers import RoutedLinear, RoutingState
from esm_ray.routed.predict import encode, predict
from esm_ray.routed.save import save, state_files
from esm_ray.routed.sizes import sizes


@dataclass
class Head:
    """A task's classification head on the mean-pooled last hidden state."""

    linear: nn.Linear
    labels: list[str]

    @property
    def n_labels(self) -> int:
        return int(self.linear.out_features)


@dataclass
class SimRouter:
    """SiM state: per task the mean (T, d) and basis (T, d, k) of its support subspace."""

    means: Tensor
    bases: Tensor
    normalize: bool = True
    relative: bool = False

    def route(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return sim_route(features, self.means, self.bases, self.normalize, self.relative)


@dataclass
class RoutedOutput:
    """One forward pass.

    hidden:        (N, L, d) last hidden state
    pooled:        (N, d) its mean over each sample's tokens
    task:          (N,) long, the task whose expert (mostly) served the sample; −1 = none
    scores:        (N, T) router scores (prototype: mean cosine over layers; SiM: −residual),
                   None for oracle / none
    layer_choices: (N, n_routed_layers) the expert each routed layer used (prototype/SiM/oracle)
    raw:           the wrapped model's own output
    """

    hidden: Tensor
    pooled: Tensor
    task: Tensor
    scores: Tensor | None
    layer_choices: Tensor | None
    raw: Any = None


@dataclass
class Classified:
    """Predictions of `RoutedModel.classify`: per sample the task used, label id and logits."""

    task: Tensor
    label_ids: Tensor
    logits: list[Tensor]
    output: RoutedOutput


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    return {"output_hidden_states": True, **forward_kwargs(model)}


def resolve_module(model: nn.Module, name: str) -> str:
    """The model's own name for a checkpoint module name (handles the base-model prefix)."""
    names = dict(model.named_modules())
    if name in names:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in names:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in names:
        return f"{prefix}.{name}"
    raise KeyError(f"the model has no module {name!r}")


class RoutedModel(nn.Module):
    """A merged model with per-sample routed low-rank experts.

    Args:
        model:      the merged Hugging Face model (its routed nn.Linear layers get wrapped)
        tasks:      the T task names, in expert order
        experts:    {module: (B (T, d_out, r), A (T, r, d_in))}, module names as in the checkpoint
        prototypes: {module: (T, d_in)} for the prototype router
        sim:        SiM router state, with `backbone` the pretrained model for its features
        heads:      {task: Head}
        router:     default router ("prototype", "sim", "oracle" or "none")
        manifest:   the routed manifest (method, rank, layers, ...) kept for /v1/model and save
    """

    def __init__(self, model: nn.Module, tasks: Sequence[str],
                 experts: dict[str, tuple[Tensor, Tensor]] | None = None,
                 prototypes: dict[str, Tensor] | None = None, sim: SimRouter | None = None,
                 backbone: nn.Module | None = None, heads: dict[str, Head] | None = None,
                 router: str | None = None, manifest: dict[str, Any] | None = None,
                 tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.tasks = list(tasks)
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"task names must be unique: {self.tasks}")
        self.state = RoutingState()
        self.routed: dict[str, RoutedLinear] = {}
        protos = prototypes or {}
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        experts = dict(sorted((experts or {}).items(), key=lambda kv: order.get(resolve_module(model, kv[0]), 0)))
        for module, (b, a) in experts.items():
            if b.shape[0] != len(self.tasks):
                raise ValueError(f"{module}: experts for {b.shape[0]} tasks, model has {len(self.tasks)}")
            own = resolve_module(model, module)
            parent, _, child = own.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            lin = getattr(holder, child)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{module} is a {type(lin).__name__}, not an nn.Linear")
            rl = RoutedLinear(lin, b, a, protos.get(module), self.state, module)
            setattr(holder, child, rl)
            self.routed[module] = rl
        self.sim = sim
        if sim is not None and sim.means.shape[0] != len(self.tasks):
            raise ValueError(f"SiM router has {sim.means.shape[0]} tasks, model has {len(self.tasks)}")
        self.backbone = backbone.eval() if backbone is not None else None
        self.heads = dict(heads or {})
        self._heads = nn.ModuleDict({str(i): h.linear for i, h in enumerate(self.heads.values())})
        self.manifest = dict(manifest or {})
        self.tokenizer = tokenizer
        self.source_dir: Path | None = None
        available = self.routers
        self.router = router or (available[0] if available else "none")
        if self.router not in available:
            raise ValueError(f"router {self.router!r} is not available for this model (have: {', '.join(available)})")
        self._fwd_kwargs = _forward_kwargs(model)
        self._lock = threading.Lock()

    # ---- facts ---------------------------------------------------------------------------
    @property
    def routers(self) -> list[str]:
        """Routers this model can run, the default first."""
        out = []
        if self.routed and all(r.prototypes is not None for r in self.routed.values()):
            out.append("prototype")
        if self.routed and self.sim is not None and self.backbone is not None:
            out.append("sim")
        if self.routed:
            out.append("oracle")
        out.append("none")
        pref = self.manifest.get("router")
        if pref in out:
            out.remove(pref)
            out.insert(0, pref)
        return out

    @property
    def vocab_size(self) -> int:
        """Token ids this model accepts: [0, vocab_size) (its input embedding's rows)."""
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if isinstance(emb, nn.Embedding):
            return int(emb.num_embeddings)
        return int(getattr(self.model.config, "vocab_size"))

    @property
    def max_positions(self) -> int | None:
        """Most tokens per input the model's position embeddings allow (None: no fixed limit)."""
        cfg = self.model.config
        n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if not isinstance(n, int) or n <= 0:
            return None
        if getattr(cfg, "model_type", "") in _OFFSET_POSITIONS:  # positions start after the padding index
            n -= int(getattr(cfg, "pad_token_id", 0) or 0) + 1
        return max(n, 1)

    @property
    def rank(self) -> int:
        return max((r.rank for r in self.routed.values()), default=0)

    def task_index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise KeyError(f"unknown task {task!r} (known: {', '.join(self.tasks)})") from None

    # ---- forward -------------------------------------------------------------------------
    def backbone_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The SiM feature: the pretrained backbone's mean-pooled last hidden state. (N, d)"""
        if self.backbone is None:
            raise RuntimeError("this model stores no backbone for the SiM router")
        return pooled_features(self.backbone, input_ids, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, router: str | None = None,
                task_ids: Tensor | None = None) -> RoutedOutput:
        """Route every sample on its own and run the merged model with its experts.

        task_ids: (N,) long, a sample's own task (≥ 0) or −1 to let the router decide; the
                  "oracle" router needs a task for every sample.
        """
        router = router or self.router
        if router not in ROUTER_KINDS:
            raise ValueError(f"unknown router {router!r} (allowed: {', '.join(ROUTER_KINDS)})")
        n = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        force = None
        if task_ids is not None:
            force = torch.as_tensor(task_ids, dtype=torch.long, device=input_ids.device).reshape(-1)
            if force.shape[0] != n:
                raise ValueError(f"task_ids has {force.shape[0]} entries for {n} samples")
            if bool((force >= len(self.tasks)).any()) or bool((force < -1).any()):
                raise ValueError(f"task ids must be in [-1, {len(self.tasks) - 1}]")
        if router == "oracle" and (force is None or bool((force < 0).any())):
            raise ValueError("the oracle router needs a task for every sample")
        if router != "none" and router not in self.routers:
            raise ValueError(f"router {router!r} is not available for this model (have: {', '.join(self.routers)})")

        with self._lock:  # the routed layers share one RoutingState: one forward at a time
            return self._forward(input_ids, attention_mask, router, force)

    def _forward(self, input_ids: Tensor, attention_mask: Tensor, router: str, force: Tensor | None) -> RoutedOutput:
        n = input_ids.shape[0]
        st = self.state
        st.reset()
        st.mask = attention_mask
        scores: Tensor | None = None
        task = force.clone() if force is not None else torch.full((n,), -1, dtype=torch.long, device=input_ids.device)
        if router == "none" or not self.routed:
            st.mode = "none"
        elif router == "oracle":
            st.mode, st.choice = "fixed", force
        elif router == "sim":
            assert self.sim is not None
            choice, scores = self.sim.route(self.backbone_features(input_ids, attention_mask))
            if force is not None:
                choice = torch.where(force >= 0, force, choice.to(force.device))
            st.mode, st.choice = "fixed", choice
            task = choice
        else:
            st.mode, st.force = "prototype", force
        try:
            raw = self.model(input_ids=input_ids, attention_mask=attention_mask, **self._fwd_kwargs)
            trace = dict(st.trace)
        finally:
            st.reset()
        hidden = last_hidden(raw)
        pooled = token_mean(hidden, attention_mask)
        layer_choices = None
        if trace:
            layer_choices = torch.stack([trace[m][0] for m in self.routed if m in trace], 1)
            if router == "prototype":
                layer_scores = torch.stack([trace[m][1] for m in self.routed if m in trace], 1)  # (N, L, T)
                scores = layer_scores.mean(1)
                task = vote(layer_choices, len(self.tasks), layer_scores)
                if force is not None:
                    task = torch.where(force >= 0, force, task.to(force.device))
        return RoutedOutput(hidden, pooled, task, None if scores is None else scores.detach(), layer_choices, raw)

    def classify(self, input_ids: Tensor, attention_mask: Tensor | None = None, router: str | None = None,
                 task_ids: Tensor | None = None) -> Classified:
        """Route, then apply each sample's task head to its pooled feature."""
        out = self(input_ids, attention_mask, router, task_ids)
        n = input_ids.shape[0]
        task = out.task.cpu()
        label_ids = torch.full((n,), -1, dtype=torch.long)
        logits: list[Tensor] = [torch.empty(0)] * n
        for t in torch.unique(task).tolist():
            if t < 0:
                raise ValueError("a sample has no task: give its task or use a router")
            name = self.tasks[t]
            if name not in self.heads:
                raise KeyError(f"no head for task {name!r}")
            rows = torch.nonzero(task == t).squeeze(1)
            head = self.heads[name].linear
            lg = head(out.pooled.index_select(0, rows.to(out.pooled.device)).to(head.weight.dtype))
            label_ids[rows] = lg.argmax(-1).cpu()
            for j, i in enumerate(rows.tolist()):
                logits[i] = lg[j].float().cpu()
        return Classified(task, label_ids, logits, out)

    # ---- text in, labels out (routed.predict), sizes (routed.sizes), save (routed.save) -----
    def encode(self, inputs: Sequence[str | Sequence[int]], max_length: int = 128) -> tuple[Tensor, Tensor]:
        """Right-padded (input_ids, attention_mask) for texts or id lists (routed.predict.encode)."""
        return encode(self, inputs, max_length)

    def predict(self, inputs: Sequence[str | Sequence[int]], tasks: Sequence[str | None] | None = None,
                router: str | None = None, max_length: int = 128) -> list[dict[str, Any]]:
        """Per input: {"task", "label", "label_id", "scores"} (routed.predict.predict)."""
        return predict(self, inputs, tasks, router, max_length)

    def sizes(self) -> dict[str, Any]:
        """Bytes of each part and of T full experts (routed.sizes.sizes)."""
        return sizes(self)

    # ---- the plain merged model and saving -------------------------------------------------
    def merged_state(self) -> dict[str, Tensor]:
        """The merged model's state dict, with the plain nn.Linear layers' own names."""
        with self.unwrapped():
            return dict(self.model.state_dict())

    @contextmanager
    def unwrapped(self) -> Iterator[nn.Module]:
        """The wrapped model with its plain merged nn.Linear layers back in place."""
        swaps = []
        for module, rl in self.routed.items():
            own = resolve_module(self.model, module)
            parent, _, child = own.rpartition(".")
            holder = self.model.get_submodule(parent) if parent else self.model
            setattr(holder, child, rl.base)
            swaps.append((holder, child, rl))
        try:
            yield self.model
        finally:
            for holder, child, rl in swaps:
                setattr(holder, child, rl)

    def save(self, path: str | Path, expert_dtype: str | None = None) -> Path:
        """Write the routed directory: merged base (HF layout), routed/*, heads/* (routed.save)."""
        return save(self, path, expert_dtype)

    def state_files(self, expert_dtype: str | None = None) -> dict[str, dict[str, Tensor] | bytes]:
        """{relative path: tensors or bytes} of everything but the merged base (routed.save)."""
        return state_files(self, expert_dtype)


# model types whose position ids start at pad_token_id + 1 (RoBERTa's convention)
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                               "longformer", "roberta-prelayernorm", "xmod"})

__all__ = ["Classified", "Head", "RoutedModel", "RoutedOutput", "SimRouter", "resolve_module"]

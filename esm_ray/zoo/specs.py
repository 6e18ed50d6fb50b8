"""Merge specs for a built zoo: one YAML per method, ready for `esm-ray merge` or a sweep.

The methods and their parameters live in one table, `METHOD_TABLE`; edit it to change what a
sweep runs. Parameter names are those of the method registry (`lambda` is the alias of
`lambda_`; PAVE's `rho` is the target kept-rank fraction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from esm_ray.errors import InputError
from esm_ray.spec import MergeSpec, dump_spec, spec_from_dict
from esm_ray.zoo.layout import Zoo, open_zoo


@dataclass(frozen=True)
class MethodEntry:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    purify: dict[str, Any] | None = None  # PAVE params, or None for no purification
    rescale: dict[str, Any] | None = None  # the spec's `rescale` (RescaleSpec), or None


SEARCH_BUDGET: dict[str, Any] = {"steps": 60, "batch_size": 16, "samples": 64}

METHOD_TABLE: dict[str, MethodEntry] = {
    "linear": MethodEntry("linear"),
    "task_arithmetic": MethodEntry("task_arithmetic", {"lambda": 0.3}),
    "ties": MethodEntry("ties", {"density": 0.2, "lambda": 1.0}),
    "dare_ties": MethodEntry("dare_ties", {"density": 0.2, "lambda": 1.0, "normalize": True}),
    "tsvm": MethodEntry("tsvm"),
    # the ViT recipe (×2, inter-task and inter-column scaling) beat the RoBERTa recipe at α = 1 on
    # this zoo's validation splits (78.4 vs 76.6 mean accuracy), so it is the zoo's label-free default
    "esm": MethodEntry("esm", {"preset": "vit", "alpha": 1.0}),
    "esm_roberta": MethodEntry("esm", {"preset": "roberta", "alpha": 1.0}),
    # RegMean at the papers' off-diagonal scaling (FusionBench's reduce_non_diagonal_ratio), from
    # the same cached statistics as ESM and PAVE
    "regmean": MethodEntry("regmean", {"alpha": 0.9}),
    "pave_task_arithmetic": MethodEntry("task_arithmetic", {"lambda": 0.3}, {"rho": 0.96875}),
    "pave_ties": MethodEntry("ties", {"density": 0.2, "lambda": 1.0}, {"rho": 0.984375}),
    "pave_tsvm": MethodEntry("tsvm", {}, {"rho": 0.96875}),
    # PAVE as published (the fine-tuned weight truncated; lowers every method on our zoos)
    "pave_weight_task_arithmetic": MethodEntry("task_arithmetic", {"lambda": 0.3},
                                               {"rho": 0.96875, "subject": "weight"}),
    "pave_weight_ties": MethodEntry("ties", {"density": 0.2, "lambda": 1.0}, {"rho": 0.984375, "subject": "weight"}),
    "pave_weight_tsvm": MethodEntry("tsvm", {}, {"rho": 0.96875, "subject": "weight"}),
    # searches on unlabelled calibration rows; the step budget fits a 2-core CPU (see docs/methods-concrete.md)
    # (lr 0.05 for masks and 0.01 for coefficients collapsed: the entropy fell 3x while test
    # accuracy fell 12 points for concrete_ta, 1.5 for adamerging; see the README)
    "concrete_ta": MethodEntry("concrete_ta", {**SEARCH_BUDGET, "lr": 0.005, "mask_scope": "linear"}),
    "adamerging": MethodEntry("adamerging", {**SEARCH_BUDGET, "lr": 0.002}),
    "adamerging_im": MethodEntry("adamerging", {**SEARCH_BUDGET, "lr": 0.01, "objective": "im"}),
    "adamerging_distill": MethodEntry("adamerging", {**SEARCH_BUDGET, "lr": 0.01, "objective": "distill"}),
    "concrete_adamerging": MethodEntry("concrete_adamerging", {
        **SEARCH_BUDGET, "steps": 30, "lr": 0.005, "mask_scope": "linear", "adamerging_steps": 30,
        "adamerging_lr": 0.002}),
    # routed (ESM++ / SiM): the "esm" base (ViT recipe, α 1) + rank-r residual experts;
    # SiM fits its task subspaces on `support_samples` rows of each expert's calib.jsonl
    "esm_pp_r8": MethodEntry("esm_pp", {"rank": 8, "base_params": {"preset": "vit"}}),
    "esm_pp_r32": MethodEntry("esm_pp", {"rank": 32, "base_params": {"preset": "vit"}}),
    "sim": MethodEntry("sim", {"base_params": {"preset": "vit"}}),
}


def spec_for(zoo: Zoo, name: str, output: str | Path, tasks: Sequence[str] | None = None,
             entry: MethodEntry | None = None, calibration: dict[str, Any] | None = None) -> MergeSpec:
    """The MergeSpec merging the zoo's experts with the method `name` of METHOD_TABLE."""
    if entry is None:
        if name not in METHOD_TABLE:
            raise InputError(f"no method {name!r} in METHOD_TABLE; known: {', '.join(METHOD_TABLE)}")
        entry = METHOD_TABLE[name]
    names = list(tasks) if tasks else zoo.tasks
    cal = {"samples": 64, "max_length": int(zoo.manifest.get("max_length", 128)), "batch_size": 16}
    raw: dict[str, Any] = {
        "base": str(zoo.base_dir),
        "experts": [{"name": t, "model": str(zoo.expert_dir(t)), "data": str(zoo.calib_path(t))} for t in names],
        "method": {"name": entry.method, "params": dict(entry.params)},
        "output": str(Path(output).expanduser().resolve()),
        "overwrite": True,
        "calibration": {**cal, **(calibration or {})},
    }
    if entry.purify is not None:
        raw["purify"] = {"name": "pave", "params": dict(entry.purify)}
    if entry.rescale is not None:
        raw["rescale"] = dict(entry.rescale)
    return spec_from_dict(raw, source=f"zoo spec {name}")


def write_specs(zoo_dir: str | Path, out_dir: str | Path, methods: Sequence[str] | None = None,
                merged_root: str | Path | None = None, tasks: Sequence[str] | None = None) -> list[Path]:
    """Write `<out_dir>/<method>.yaml` for each method; merged models go to `<merged_root>/<method>`
    (default `<out_dir>/merged/<method>`). Returns the spec paths."""
    zoo = open_zoo(zoo_dir)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    merged = Path(merged_root).expanduser() if merged_root else out / "merged"
    paths = []
    for name in methods or list(METHOD_TABLE):
        spec = spec_for(zoo, name, merged / name, tasks)
        p = out / f"{name}.yaml"
        p.write_text(dump_spec(spec))
        paths.append(p)
    return paths


def spec_label(spec: MergeSpec) -> str:
    """A short row name for a spec: the method, 'pave+' when purified ('pave[weight]+' for the
    published form), and its non-default params."""
    params = ", ".join(f"{k}={v}" for k, v in spec.method.params.items())
    name = spec.method.name if not params else f"{spec.method.name} ({params})"
    if spec.purify is None:
        return name
    return f"pave[weight]+{name}" if (spec.purify.params or {}).get("subject") == "weight" else f"pave+{name}"

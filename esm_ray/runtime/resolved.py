"""What each tensor gets: the per-tensor parameters of a plan, resolved, for the dry run."""

from __future__ import annotations

from esm_ray.methods import ExpertContext
from esm_ray.runtime.layout import tensor_infos
from esm_ray.runtime.plan import MergePlan


def resolved_lines(plan: MergePlan) -> list[str]:
    """One line per tensor: the method's parameters that vary (gradients, filters, slices) and
    each expert's weight, density and own parameters, as the merge will use them. Empty when
    nothing varies."""
    m = plan.method
    if not m.per_tensor:
        return []
    varying = set(m.varying) | {k for sp in m.slice_params for k in sp}
    ctxs = [ExpertContext(i, e.name, e.weight, e.density) for i, e in enumerate(plan.spec.experts)]
    lines = ["per-tensor parameters (slice, position t, values):"]
    for info in tensor_infos(plan, set()):
        if not plan.dtypes[info.name].is_floating_point:
            continue
        p = m.params_for(info).model_dump(by_alias=True)
        shared = ", ".join(f"{k}={_fmt(p[k])}" for k in sorted(varying) if k in p)
        per = []
        for c in ctxs:
            r = m.context_for(c, info)
            own = [f"weight={_fmt(r.weight)}"] + ([f"density={_fmt(r.density)}"] if r.density is not None else [])
            own += [f"{k}={_fmt(v)}" for k, v in sorted(r.params.items())]
            per.append(f"{c.name}({', '.join(own)})")
        lines.append(f"  {info.name}  [slice {info.slice}, t={info.position:.3f}]  "
                     + "; ".join(x for x in (shared, " ".join(per)) if x))
    return lines


def _fmt(v: object) -> str:
    return f"{v:.6g}" if isinstance(v, float) else repr(v)

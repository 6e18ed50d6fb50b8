"""Task evaluation against a built zoo, sweeps over merge specs, report tables and charts.

- `evaluate_encoder(model_dir, zoo_dir, split, tasks)`: per-task accuracy with each task's head,
  normalised accuracy (model / expert) and averages; `evaluate_lm` for per-domain perplexity
- `sweep(specs, zoo_dir, merge_fn)`: merge, evaluate, one `ReportTable` with the baseline rows
- `search_alpha` (ESM α, golden section on validation), `select_lambda` (task-arithmetic λ grid)
- `evaluate_routed_zoo(model_dir, zoo_dir)`: a routed (ESM++ / SiM) directory per router: accuracy,
  routing accuracy, confusion; `sweep` and `esm-ray eval` give such a directory one row per router
- `evaluate_routed_lm_zoo(model_dir, zoo_dir)`: a routed causal LM on an LM zoo: each item routed on
  its own text and scored with its routed adapter; `routed_lm_rows` (routed, prefix-routed, oracle)
- `write_report(table, out_dir)`: report.json, report.md, report.png (+ confusion PNGs of routed rows)

Names are imported on first use so that `import esm_ray.eval` stays cheap.
"""

from importlib import import_module

_EXPORTS = {
    "evaluate_encoder": "esm_ray.eval.metrics", "evaluate_lm": "esm_ray.eval.metrics",
    "evaluate_model": "esm_ray.eval.metrics", "evaluate_probe": "esm_ray.eval.metrics",
    "expert_results": "esm_ray.eval.metrics", "perplexity": "esm_ray.eval.metrics",
    "sweep": "esm_ray.eval.sweep", "search_alpha": "esm_ray.eval.sweep", "select_lambda": "esm_ray.eval.sweep",
    "golden_section_max": "esm_ray.eval.sweep", "ReportTable": "esm_ray.eval.report", "Row": "esm_ray.eval.report",
    "write_report": "esm_ray.eval.report", "to_markdown": "esm_ray.eval.report",
    "evaluate_routed_zoo": "esm_ray.eval.routed", "routed_rows": "esm_ray.eval.routed",
    "evaluate_routed_lm_zoo": "esm_ray.eval.routed_lm", "routed_lm_rows": "esm_ray.eval.routed_lm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'esm_ray.eval' has no attribute {name!r}")

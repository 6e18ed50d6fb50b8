"""The offline test bed: real experts from packaged models and data.

- `build_zoo` (MiniLM encoder experts on packaged classification tasks, cached by hash)
- `build_lm_zoo` (SmolLM2-135M domain and label-task experts, `esm_ray.zoo.lm_zoo`), `convert_smollm2`
- `load_task`, `TASKS`, `DEFAULT_TASKS` (the tasks and their fixed-seed splits)
- `open_zoo` (read a built zoo), `write_specs` / `METHOD_TABLE` (merge specs for a zoo)

Names are imported on first use so that `import esm_ray.zoo` stays cheap.
"""

from importlib import import_module

_EXPORTS = {
    "build_zoo": "esm_ray.zoo.build", "zoo_key": "esm_ray.zoo.build", "TrainConfig": "esm_ray.zoo.training",
    "build_lm_zoo": "esm_ray.zoo.lm_zoo", "convert_smollm2": "esm_ray.zoo.smollm2",
    "load_task": "esm_ray.zoo.tasks", "TASKS": "esm_ray.zoo.tasks", "DEFAULT_TASKS": "esm_ray.zoo.tasks",
    "open_zoo": "esm_ray.zoo.layout", "Zoo": "esm_ray.zoo.layout", "default_root": "esm_ray.zoo.layout",
    "write_specs": "esm_ray.zoo.specs", "spec_for": "esm_ray.zoo.specs", "METHOD_TABLE": "esm_ray.zoo.specs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'esm_ray.zoo' has no attribute {name!r}")

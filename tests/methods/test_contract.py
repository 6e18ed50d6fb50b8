"""The method contract: each method is generic over its own Params, which the registry validates."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from tests.builders import import_methods

import_methods()

from esm_ray.methods import METHODS, PURIFIERS, MethodParams, build_method  # noqa: E402

METHODS_DIR = Path(__file__).resolve().parents[2] / "esm_ray" / "methods"


def test_every_method_names_its_params_as_generic_argument():
    for table in (METHODS, PURIFIERS):
        for name, cls in table.items():
            assert issubclass(cls.Params, MethodParams) and cls.Params is not MethodParams, name
            declared = [a for b in cls.__mro__ for ob in getattr(b, "__orig_bases__", ()) for a in get_args(ob)
                        if isinstance(a, type) and issubclass(a, MethodParams)]
            assert cls.Params in declared or "Params" in cls.__dict__, name


def test_params_are_the_methods_own_model():
    m = build_method("ties", {"density": 0.4}, n_experts=2)
    assert type(m.params).__name__ == "TiesParams" and m.params.density == 0.4
    sim = build_method("sim", {"subspace_rank": 3}, n_experts=2)
    assert sim.params.subspace_rank == 3 and sim.params.rank == 32  # SimParams extends RoutedParams


def test_no_attribute_ignores_in_methods():
    """Typed params: the methods read their parameters without silencing the type checker."""
    offenders = [f"{p.name}:{i}" for p in sorted(METHODS_DIR.glob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "type: ignore[attr-defined]" in line]
    assert not offenders, offenders

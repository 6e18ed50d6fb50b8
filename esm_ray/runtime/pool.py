"""Expert pools: how the coordinator reaches the T expert sides."""

from __future__ import annotations

from typing import Any, Protocol

from esm_ray.runtime.expert import ExpertSide
from esm_ray.spec import MergeSpec


class ExpertPool(Protocol):
    n: int

    def call(self, method: str, *args: Any) -> list[Any]:
        """Call `method(*args)` on every expert side; results in expert order."""

    def call_each(self, method: str, args: list[tuple]) -> list[Any]:
        """Call `method(*args[i])` on expert side i; results in expert order."""

    def close(self) -> None: ...


class LocalPool:
    """All expert sides in this process, called one after another."""

    def __init__(self, spec: MergeSpec) -> None:
        self.sides = [ExpertSide(spec, i) for i in range(len(spec.experts))]
        self.n = len(self.sides)

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in self.sides]

    def call_each(self, method: str, args: list[tuple]) -> list[Any]:
        return [getattr(s, method)(*a) for s, a in zip(self.sides, args)]

    def close(self) -> None:
        for s in self.sides:
            s.close()

"""Where merged tensors go: the writer, with the post stage and resume as tees on it, or a
spill directory when a global layer-scaling pass must see every update first.

`OutputSink.add` is the one place a finished tensor is cast to the output dtype, checked,
written, handed to the method's post stage and staged for resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
import torch
from torch import Tensor

from esm_ray.errors import InputError, OutputError
from esm_ray.io.reader import check_finite
from esm_ray.io.targets import write_tensors
from esm_ray.io.writer import ShardedWriter
from esm_ray.methods import ExpertContext, MergeMethod, TensorInfo
from esm_ray.runtime.layout import OutTensor
from esm_ray.runtime.pool import ExpertPool
from esm_ray.runtime.resume import ResumeStore


def finish(merged: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """The written value of a merged tensor: cast to the output dtype and checked after the cast.
    A NaN or Inf in the result raises InputError; a finite value the output dtype cannot hold
    (it becomes Inf) raises OutputError naming the tensor and the `dtype` field. Nothing
    reaches the writer."""
    out = merged.to(dtype)
    try:
        check_finite(name, out, "merged result")
    except InputError:
        check_finite(name, merged, "merged result")  # already NaN/Inf before the cast
        big = float(merged.abs().max())
        kind = str(dtype).removeprefix("torch.")
        raise OutputError(f"merged result: tensor '{name}' holds values up to {big:.6g}, beyond the largest "
                          f"finite {kind} ({torch.finfo(dtype).max:.6g}); they would be written as Inf. "
                          f"Set the spec's `dtype` to float32 or bfloat16") from None
    return out


class PostStage:
    """The method's post stage (routed residual experts): each written tensor it applies to is
    queued, and the experts' post parts are computed and fused a batch at a time."""

    def __init__(self, method: MergeMethod, pool: ExpertPool, ctxs: list[ExpertContext]) -> None:
        self.method, self.pool, self.ctxs = method, pool, ctxs
        self.active = method.post_stage
        self._queue: list[tuple[TensorInfo, Tensor]] = []

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, info: TensorInfo, written: Tensor) -> None:
        """The post stage sees exactly the tensor that was written (as float32)."""
        if self.active and self.method.post_applies(info):
            self._queue.append((info, written.to(torch.float32)))

    def flush(self) -> None:
        if not self._queue:
            return
        infos = [i for i, _ in self._queue]
        parts = self.pool.call("post_prepare", infos, [t for _, t in self._queue])
        for j, (info, merged) in enumerate(self._queue):
            self.method.post_fuse(info, merged, [parts[e][j] for e in range(self.pool.n)], self.ctxs)
        self._queue = []


class OutputSink:
    """The writer, with two tees: the post stage and the resume store (finished groups)."""

    def __init__(self, writer: ShardedWriter, post: PostStage, store: ResumeStore | None) -> None:
        self.writer, self.post, self.store = writer, post, store
        self._group: dict[str, Tensor] = {}
        self._names: list[str] = []  # the group's finished tensors in order, streamed ones too

    def add(self, out: OutTensor, merged: Tensor) -> None:
        """A merged float32 value: finish, write, tee."""
        self.add_final(out, finish(merged, out.info.name, out.dtype))

    def add_final(self, out: OutTensor, value: Tensor) -> None:
        """A value already in the output dtype (finished, or restored from the resume store)."""
        self.writer.add(out.info.name, value)
        self.post.offer(out.info, value)
        if self.store is not None and out.how != "restored":
            self._group[out.info.name] = value
            self._names.append(out.info.name)

    def add_blocks(self, out: OutTensor, merged_blocks: Iterator[Tensor]) -> None:
        """Row blocks of merged float32 values, in order: finished and written block by block;
        with resume, the finished blocks are staged as they pass (no post stage applies: see
        layout)."""
        name, dtype, shape = out.info.name, out.dtype, out.info.shape
        blocks: Iterator[Tensor] = (finish(b, name, dtype) for b in merged_blocks)
        if self.store is not None:
            blocks = self.store.tee_rows(out.group, name, dtype, shape, blocks)
            self._names.append(name)
        self.writer.add_blocks(name, dtype, shape, blocks)

    def add_restored_blocks(self, out: OutTensor, blocks: Iterator[Tensor]) -> None:
        """Row blocks of a tensor restored from the resume store, already in the output dtype."""
        self.writer.add_blocks(out.info.name, out.dtype, out.info.shape, blocks)

    def copy(self, out: OutTensor, blocks: Iterator[Tensor]) -> None:
        """A tensor taken from the base as it is (in the output dtype), as consecutive row blocks."""
        self.writer.add_blocks(out.info.name, out.dtype, out.info.shape, blocks)

    def end_group(self, index: int) -> None:
        """A group is finished: stage it for resume, run the post stage on it."""
        if self.store is not None and self._names:
            self.store.save(index, self._group, names=self._names)
        self._group, self._names = {}, []
        self.post.flush()


class SpillSink:
    """Fused updates ΔW of one group at a time, saved to disk with their norms, for a global
    layer-scaling pass (ESM) that needs every norm before anything is written."""

    def __init__(self, root: Path, store: ResumeStore | None) -> None:
        self.root, self.store = root, store
        self.norms: dict[str, float] = {}
        self._group: dict[str, Tensor] = {}

    def add_delta(self, out: OutTensor, delta: Tensor) -> None:
        self.norms[out.info.name] = float(torch.linalg.vector_norm(delta))
        self._group[out.info.name] = delta.contiguous()

    def restored(self, norms: dict[str, float]) -> None:
        self.norms.update(norms)

    def end_group(self, index: int) -> None:
        if not self._group:
            return
        if self.store is not None:
            self.store.save(index, self._group, {k: self.norms[k] for k in self._group})
        else:
            path = self.root / f"group-{index:05d}.safetensors"
            try:
                write_tensors(path, self._group)
            except OSError as err:  # e.g. a full disk
                raise OutputError(f"cannot write the updates kept for layer scaling: {err.strerror or err}") from None
        self._group = {}

    def spilled(self) -> dict[str, Path]:
        """{tensor name: the file holding its ΔW}, over every group file in the root."""
        from safetensors import safe_open

        where: dict[str, Path] = {}
        for f in sorted(self.root.glob("group-*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    where[k] = f
        return where


__all__ = ["OutputSink", "PostStage", "SpillSink", "finish"]

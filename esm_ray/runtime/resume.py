"""Resume an interrupted merge from the layer groups it already finished.

The coordinator stages every finished group of tensors as one safetensors file in a job
directory keyed by everything the result depends on (spec without runtime/serve/overwrite,
input fingerprints, grouping, thread count, esm-ray version):

- local output ``/x/merged``: a hidden sibling ``/x/.merged.esm-ray-resume-<key16>/``;
- S3 output: ``<cache root>/resume/<key16>/`` on the coordinator's machine.

A group file is written under a temporary name and renamed (atomic), so a file that exists is
complete; its metadata names the group's tensors and is checked before it is reused. The staged
tensors are the exact bytes the writer received (or, for methods with a global layer-scaling
pass, the fused updates and their norms), so a resumed job writes the same output bytes.

A tensor merged in row blocks is never whole in memory: its finished blocks are streamed, as
the writer receives them, into a file of its own (``rows-<group>-<hash>.safetensors``,
renamed into place after its last row), and the group file, written after them, lists it
under ``streamed``. A group counts as done only when its group file and every streamed file
it lists are there; a resumed job reads those back block by block.

The job directory is never the output: the writer stages the output elsewhere and writes the
index last, so a killed job leaves no finished-looking model. The directory is removed once the
output is committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

import esm_ray
from esm_ray.io.rowfile import file_metadata, read_rows, tee_rows
from esm_ray.io.uri import is_s3
from esm_ray.io.writer import save_safetensors_atomic

if TYPE_CHECKING:
    from esm_ray.runtime.plan import MergePlan

log = logging.getLogger("esm_ray.resume")

FORMAT = "esm-ray/resume/1"
JOB_FILE = "job.json"


def job_key(plan: MergePlan, group_bytes: int, threads: int) -> str:
    """sha256 of everything a staged group depends on."""
    spec = plan.spec.model_dump(mode="json", exclude={"runtime", "serve", "overwrite"})
    payload = {
        "format": FORMAT,
        "esm_ray": esm_ray.__version__,
        "torch": torch.__version__,
        "spec": spec,
        "base": plan.base_fingerprint,
        "experts": plan.expert_fingerprints,
        "names": plan.names,
        "out_dtype": str(plan.out_dtype),
        "group_bytes": group_bytes,
        "threads": threads,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def job_dir(plan: MergePlan, key: str) -> Path:
    """Where the staged groups of this job live (see the module docstring)."""
    out = plan.spec.output
    if is_s3(out):
        from esm_ray.stats.calibrate import cache_root

        return cache_root(plan.spec.calibration) / "resume" / key[:16]
    p = Path(out)
    return p.parent / f".{p.name}.esm-ray-resume-{key[:16]}"


class ResumeStore:
    """The finished groups of one job, one safetensors file per group."""

    def __init__(self, root: Path, key: str) -> None:
        self.root = root
        self.key = key
        self.restored = 0
        self.total = 0

    @classmethod
    def open(cls, plan: MergePlan, group_bytes: int, threads: int) -> "ResumeStore":
        key = job_key(plan, group_bytes, threads)
        root = job_dir(plan, key)
        root.mkdir(parents=True, exist_ok=True)
        meta = root / JOB_FILE
        if not meta.is_file():
            meta.write_text(json.dumps({"format": FORMAT, "key": key, "output": plan.spec.output,
                                        "method": plan.method.name, "created": time.time()}, indent=2))
        return cls(root, key)

    def path(self, index: int) -> Path:
        return self.root / f"group-{index:05d}.safetensors"

    def rows_path(self, index: int, name: str) -> Path:
        """The file of one tensor of group `index` staged as its finished row blocks."""
        return self.root / f"rows-{index:05d}-{hashlib.sha256(name.encode()).hexdigest()[:16]}.safetensors"

    def _valid(self, index: int, names: list[str]) -> bool:
        p = self.path(index)
        if not p.is_file():
            return False
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
                ok = meta.get("key") == self.key and json.loads(meta.get("names", "null")) == names
            for name in json.loads(meta.get("streamed", "[]")) if ok else []:
                rows = self.rows_path(index, name)
                if not rows.is_file() or file_metadata(rows).get("key") != self.key:
                    log.warning("ignoring staged group %s: its rows of %r are missing", p.name, name)
                    return False
        except (SafetensorError, OSError, ValueError) as err:
            log.warning("ignoring unreadable staged group %s: %s", p.name, err)
            return False
        if not ok:
            log.warning("ignoring staged group %s: it belongs to another job layout", p.name)
        return ok

    def scan(self, groups: list[list[str]]) -> list[bool]:
        """Which groups (lists of computed tensor names; empty = nothing to compute) are staged.

        Logs how many of the groups that compute something are already done.
        """
        done = [bool(names) and self._valid(i, names) for i, names in enumerate(groups)]
        self.total = sum(1 for names in groups if names)
        self.restored = sum(done)
        if self.restored:
            log.info("resuming: %d of %d groups already done (staged in %s)", self.restored, self.total,
                     self.root)
        else:
            log.info("resume: staging finished groups in %s", self.root)
        return done

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """(tensors, norms) of a staged group; tensors staged as row blocks are not among the
        tensors: read them with `rows`."""
        with safe_open(str(self.path(index)), "pt") as f:
            meta = f.metadata() or {}
            streamed = set(json.loads(meta.get("streamed", "[]")))
            tensors = {k: f.get_tensor(k) for k in json.loads(meta["names"]) if k not in streamed}
        return tensors, {k: float(v) for k, v in json.loads(meta.get("norms", "{}")).items()}

    def rows(self, index: int, name: str, blocks: Iterable[tuple[int, int]]) -> Iterator[torch.Tensor]:
        """A tensor of group `index` staged as row blocks, read back as `blocks` row ranges."""
        return read_rows(self.rows_path(index, name), name, blocks)

    def tee_rows(self, index: int, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                 blocks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """`blocks` (finished output rows of tensor `name`, in order) passed through while they
        are staged; the file counts only once the group file that lists it is saved."""
        return tee_rows(self.rows_path(index, name), name, dtype, shape, blocks,
                        {"key": self.key, "group": str(index)})

    def save(self, index: int, tensors: dict[str, torch.Tensor], norms: dict[str, float] | None = None,
             names: list[str] | None = None) -> None:
        """Stage a finished group atomically (temp file + rename). `names`: every tensor of the
        group in order, when some were staged as row blocks (`tee_rows`) before this call."""
        names = list(tensors) if names is None else names
        meta = {"key": self.key, "group": str(index), "names": json.dumps(names)}
        streamed = [n for n in names if n not in tensors]
        if streamed:
            meta["streamed"] = json.dumps(streamed)
        if norms is not None:
            meta["norms"] = json.dumps(norms)  # repr of floats: exact round trip
        save_safetensors_atomic(self.path(index), {k: v.contiguous() for k, v in tensors.items()}, meta)

    def remove(self) -> None:
        """Drop the job directory (after the output is committed)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def summary(self) -> dict[str, int | str]:
        return {"dir": str(self.root), "groups": self.total, "restored": self.restored}

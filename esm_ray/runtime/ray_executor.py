"""The Ray executor: one ``ExpertWorker`` actor per expert, one ``Coordinator`` actor.

- ``ExpertWorker`` holds one ``ExpertSide`` (the same class the local executor uses) and runs
  its calls with the same torch thread count, so both executors produce the same bytes. It is
  restarted by Ray if its process dies (``max_restarts``) and the interrupted call is retried
  (``max_task_retries``); the pool replays the side's state calls (calibration, purifier plan)
  onto a restarted side before the retried call runs.
- ``RayPool`` is the ``ExpertPool`` the coordinator's ``MergeJob`` talks to: every call is
  fanned out to all workers with ``.remote`` and gathered with ``ray.get``; shared arguments go
  into the object store once. Parts come back through the object store; what a part is (task
  vector, sparse values, low-rank factors) is the method's choice.
  A tensor above `block_bytes` (blockwise methods) comes block by block instead
  (runtime/ray_blocks.py), in blocks of 1/T the rows, so the coordinator holds a few
  `block_bytes` of parts, not T whole tensors, whatever T.
- ``Coordinator`` runs ``MergeJob`` (layer loop, fusion, writer) next to the driver, stages
  finished groups (and blocked tensors' finished rows) for resume, and answers ``progress()``
  while it runs; the driver only shows a progress bar.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import resource
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from tqdm.auto import tqdm

from esm_ray.errors import EsmRayError, SpecError
from esm_ray.methods import TensorInfo
from esm_ray.io.uri import is_s3
from esm_ray.raylocal import connect, init_private
from esm_ray.runtime.expert import ExpertSide
from esm_ray.runtime.threads import math_threads, torch_threads
from esm_ray.runtime.job import MergeJob, MergeResult
from esm_ray.runtime.plan import BLOCK_BYTES, MergePlan
from esm_ray.runtime.ray_blocks import BlockFeed, RayGroupParts
from esm_ray.spec import MergeSpec, RuntimeSpec

log = logging.getLogger("esm_ray.ray")

NAMESPACE = "esm-ray"
# Test-only: seconds each worker sleeps at the start of every `prepare` call, so a test can
# kill processes while a job is demonstrably mid-way. Read from the driver's environment.
TEST_SLOW_ENV = "ESM_RAY_TEST_SLOW_S"
_LOCAL = (None, "", "local")


# ---- placement ------------------------------------------------------------------------------

def worker_options(runtime: RuntimeSpec, cluster: Mapping[str, float]) -> dict[str, Any]:
    """Ray actor options of one expert worker, given the cluster's total resources.

    num_gpus_per_worker=None means one GPU per worker when the cluster has GPUs and
    runtime.device is not 'cpu', else none. Fractional values pass through (0.5 GPU: two
    experts share a device).
    """
    gpus = runtime.num_gpus_per_worker
    if gpus is None:
        gpus = 1 if cluster.get("GPU", 0) > 0 and runtime.device != "cpu" else 0
    opts: dict[str, Any] = {
        "num_cpus": runtime.num_cpus_per_worker,
        "num_gpus": gpus,
        "max_restarts": runtime.max_restarts,
        "max_task_retries": runtime.max_restarts,
    }
    if runtime.resources_per_worker:
        opts["resources"] = dict(runtime.resources_per_worker)
    return opts


def shortfall(opts: Mapping[str, Any], n_workers: int, cluster: Mapping[str, float]) -> list[str]:
    """What `n_workers` actors with `opts` need beyond the cluster's total resources."""
    need = {"CPU": opts.get("num_cpus", 1) * n_workers, "GPU": opts.get("num_gpus", 0) * n_workers}
    for k, v in (opts.get("resources") or {}).items():
        need[k] = v * n_workers
    return [f"{k}: {v:g} needed, cluster has {cluster.get(k, 0):g}"
            for k, v in need.items() if v > 0 and v > cluster.get(k, 0) + 1e-9]


# ---- the expert side as an actor ------------------------------------------------------------

def _actor_logging(level: int) -> None:
    """Actors start with an unconfigured root logger; show esm_ray's lines (Ray forwards them)."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return  # not inside an actor (e.g. a test calling the class directly)
    logger = logging.getLogger("esm_ray")
    logger.setLevel(level)
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(h)
        logger.propagate = False


class ExpertWorker:
    """One expert's side of the merge, in its own process (wrapped with ray.remote)."""

    def __init__(self, spec: MergeSpec, index: int, threads: int, log_level: int = logging.INFO,
                 slow_s: float = 0.0, imports: tuple[str, ...] = ()) -> None:
        self.name = spec.experts[index].name
        _actor_logging(log_level)
        for module in imports:  # methods registered in the driver by importing their module
            importlib.import_module(module)
        self.side = ExpertSide(spec, index)
        self.threads = threads
        self.slow_s = slow_s
        self._pool: str | None = None  # the pool whose state calls this side has absorbed
        self._applied = 0

    def __repr__(self) -> str:  # Ray uses it to prefix this actor's log lines
        return f"ExpertWorker({getattr(self, 'name', '?')})"

    def ping(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"index": self.side.index, "name": self.name, "pid": os.getpid(), "node": ctx.get_node_id(),
                "resources": ctx.get_assigned_resources(), "gpu_ids": ray.get_gpu_ids()}

    def peak_rss(self) -> int:
        """Peak resident memory of this worker process, bytes."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time of this worker process so far."""
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def call(self, method: str, pool: str, journal: list[tuple[str, Any]], args: tuple) -> Any:
        """Run `ExpertSide.<method>(*args)` after replaying state calls this side has not seen.

        `journal` lists the pool's earlier state calls on this side as (method, ObjectRef of args).
        """
        with torch_threads(self.threads):
            if pool != self._pool:
                self._pool, self._applied = pool, 0
            for name, ref in journal[self._applied:]:
                log.warning("expert %s: worker restarted; replaying %s", self.name, name)
                getattr(self.side, name)(*ray.get(ref))
                self._applied += 1
            if self.slow_s and method == "prepare":
                time.sleep(self.slow_s)
            try:
                out = getattr(self.side, method)(*args)
            except EsmRayError as err:
                raise type(err)(f"expert {self.name!r}: {err}") from err
            if method in ExpertSide.STATE_CALLS:
                self._applied += 1
            return out

    def close(self) -> None:
        self.side.close()


_RemoteWorker = ray.remote(ExpertWorker)


def _cause(err: BaseException) -> BaseException:
    """The application error inside (possibly nested) RayTaskErrors."""
    seen = 0
    while isinstance(err, RayTaskError) and getattr(err, "cause", None) is not None and seen < 8:
        err = err.cause
        seen += 1
    return err


class RayPool:
    """The ExpertPool over ExpertWorker actors; calls run in parallel, results in expert order."""

    def __init__(self, workers: list[Any], names: list[str] | None = None,
                 actor_names: list[str] | None = None) -> None:
        self.workers = list(workers)
        self.n = len(self.workers)
        self.names = names or [str(i) for i in range(self.n)]
        self.actor_names = actor_names or []  # named actors: a coordinator finds them by name
        self.id = uuid.uuid4().hex
        self.current: str | None = None  # the call in flight (for progress)
        self._journal: list[list[tuple[str, Any]]] = [[] for _ in self.workers]
        self._feeds: dict[str, BlockFeed] = {}  # tensor -> its row blocks in flight (ray_blocks)

    @classmethod
    def start(cls, spec: MergeSpec, options: Mapping[str, Any], job_id: str, slow_s: float = 0.0,
              log_level: int = logging.INFO, imports: tuple[str, ...] = ()) -> "RayPool":
        """Create one named worker actor per expert (named `<job_id>-expert-<i>` in NAMESPACE).

        `imports`: modules each worker imports first (where the method and purifier are defined).
        """
        threads = math_threads(spec)
        actor_names = [f"{job_id}-expert-{i}" for i in range(len(spec.experts))]
        workers = [_RemoteWorker.options(name=name, namespace=NAMESPACE, **options)
                   .remote(spec, i, threads, log_level, slow_s, tuple(imports))
                   for i, name in enumerate(actor_names)]
        return cls(workers, [e.name for e in spec.experts], actor_names)

    def wait_ready(self, timeout_s: float | None = None, warn_every_s: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every worker is placed and constructed; returns their ping() answers."""
        refs = [w.ping.remote() for w in self.workers]
        t0 = time.monotonic()
        while True:
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=warn_every_s)
            if not pending:
                return self._gather(refs, "start")
            waited = time.monotonic() - t0
            if timeout_s is not None and waited >= timeout_s:
                raise RuntimeError(f"{len(pending)} of {self.n} expert workers could not be placed within "
                                   f"{timeout_s:.0f}s; check the cluster's free resources (`ray status`)")
            log.warning("waiting for %d of %d expert workers to be placed (%.0fs so far); "
                        "is the cluster short of the requested resources?", len(pending), self.n, waited)

    def _get(self, i: int, ref: Any, method: str) -> Any:
        """The result of worker i's call `method` (its application error re-raised as such)."""
        try:
            return ray.get(ref)
        except RayActorError as err:
            raise RuntimeError(f"expert worker {self.names[i]!r} died during {method} and could not be "
                               f"restarted: {err}") from None
        except RayTaskError as err:
            cause = _cause(err)
            if isinstance(cause, EsmRayError):
                raise cause from None
            raise

    def _gather(self, refs: list[Any], method: str) -> list[Any]:
        return [self._get(i, ref, method) for i, ref in enumerate(refs)]

    def _submit(self, method: str, per_worker: list[Any]) -> list[Any]:
        """Start `method` on every worker (after the state calls it has not seen); the refs."""
        return [w.call.remote(method, self.id, list(self._journal[i]), per_worker[i])
                for i, w in enumerate(self.workers)]

    def _run(self, method: str, per_worker: list[Any]) -> list[Any]:
        self.current = method
        refs = self._submit(method, per_worker)
        out = self._gather(refs, method)
        if method in ExpertSide.STATE_CALLS:
            for i, args in enumerate(per_worker):
                self._journal[i].append((method, args if isinstance(args, ray.ObjectRef) else ray.put(args)))
        self.current = None
        return out

    def call(self, method: str, *args: Any) -> list[Any]:
        ref = ray.put(tuple(args))  # once, shared by every worker
        return self._run(method, [ref] * self.n)

    def call_each(self, method: str, args: list[tuple]) -> list[Any]:
        return self._run(method, [ray.put(tuple(a)) for a in args])

    blockwise = True  # large tensors come from the workers row block by row block (ray_blocks)
    early_states = False  # a worker answers one tensor's block requests at a time, in order

    @property
    def block_parts(self) -> int:
        """Every worker's part of a block is requested at once: the block rows shrink by T, so
        the T parts of a block together stay about `block_bytes`, whatever T (ray_blocks)."""
        return self.n

    def group_parts(self, infos: list[TensorInfo]) -> RayGroupParts:
        """Every worker prepares its parts of the group's whole tensors in parallel, fetched at
        once; the group's blocked tensors come through `block_states`' feeds."""
        return RayGroupParts(self.call("prepare", infos) if infos else [[] for _ in range(self.n)], self._feeds)

    def expect_blocks(self, order: list[tuple[TensorInfo, list[tuple[int, int]]]]) -> None:
        """Nothing to start early: each worker makes its block state when `block_states` asks."""

    def block_states(self, info: TensorInfo, blocks: list[tuple[int, int]]) -> list[Any]:
        """Every worker computes and keeps its block state of `info`; its blocks then come
        through a feed (the states stay on the workers: None here)."""
        self.call("block_begin", info, blocks)

        def submit(b: int) -> list[Any]:
            self.current = "prepare_rows"
            return self._submit("prepare_rows", [ray.put((info, blocks, b))] * self.n)

        self._feeds[info.name] = BlockFeed(submit, lambda i, r: self._get(i, r, "prepare_rows"), blocks)
        return [None] * self.n

    def peak_rss(self) -> list[int]:
        return ray.get([w.peak_rss.remote() for w in self.workers])

    def close(self, kill: bool = True) -> None:
        for w in self.workers:
            try:
                if kill:
                    ray.kill(w, no_restart=True)
                else:
                    ray.get(w.close.remote())
            except Exception:  # already gone
                pass


# ---- the coordinator ------------------------------------------------------------------------

@ray.remote(num_cpus=0, max_concurrency=2)
class Coordinator:
    """Owns the layer loop, fusion and the writer; the driver only polls progress()."""

    def __init__(self, plan: MergePlan, worker_names: list[str], names: list[str], resume: bool = True,
                 log_level: int = logging.INFO, block_bytes: int = BLOCK_BYTES) -> None:
        # Workers are passed by actor name, not handle: handles in the constructor arguments would
        # put them in the object store, which a restarted coordinator might not find again.
        _actor_logging(log_level)
        self.plan = plan
        self.worker_names = worker_names
        self.names = names
        self.resume = resume
        self.block_bytes = block_bytes
        self.pool: RayPool | None = None
        self.state: dict[str, Any] = {"stage": "starting", "done": 0, "total": len(plan.names)}

    def __repr__(self) -> str:
        return "Coordinator"

    def pid(self) -> int:
        return os.getpid()

    def peak_rss(self) -> int:
        """Peak resident memory of the coordinator process, bytes."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _advance(self, n: int, total: int) -> None:
        self.state["done"] += n
        self.state["total"] = total

    def progress(self) -> dict[str, Any]:
        stage = self.state["stage"]
        if self.pool is not None and self.pool.current:
            stage = self.pool.current
        return dict(self.state, stage=stage)

    def run(self) -> MergeResult:
        workers = [ray.get_actor(n, namespace=NAMESPACE) for n in self.worker_names]
        self.pool = RayPool(workers, self.names, self.worker_names)  # a fresh journal on every (re)start
        self.state.update(stage="merge", done=0)
        job = MergeJob(self.plan, self.pool, progress=False, executor="ray", resume=self.resume,
                       block_bytes=self.block_bytes)
        job.on_progress = self._advance
        result = job.run()
        self.state["stage"] = "done"
        return result


# ---- connecting and running -----------------------------------------------------------------

@contextmanager
def ray_session(runtime: RuntimeSpec, n_workers: int) -> Iterator[str]:
    """Connect per runtime.address; yields a description of what was connected or started.

    - Ray already initialised in this process: reuse it, leave it running.
    - 'auto', 'ray://host:10001', 'host:port': connect to that cluster, disconnect after.
    - None or 'local': start a private Ray on 127.0.0.1 (no dashboard), shut it down after.
    """
    if ray.is_initialized():
        yield "the Ray already initialised in this process"
        return
    address = runtime.address
    if address in _LOCAL:
        cores = os.cpu_count() or 1
        need = math.ceil(n_workers * runtime.num_cpus_per_worker)
        num_cpus = max(cores, need)
        init_private(num_cpus, namespace=NAMESPACE, log_to_driver=True)
        what = (f"a private local Ray on 127.0.0.1 with {num_cpus} logical CPUs "
                f"({cores} cores{', oversubscribed to fit ' + str(n_workers) + ' workers' if need > cores else ''}), "
                "no dashboard")
        log.info("started %s; it is shut down when the job ends", what)
        try:
            yield what
        finally:
            ray.shutdown()
            log.info("local Ray shut down")
        return
    connect(address, namespace=NAMESPACE, log_to_driver=True)
    what = f"the Ray cluster at {address}"
    log.info("connected to %s", what)
    try:
        yield what
    finally:
        ray.shutdown()


@dataclass
class _Bar:
    bar: Any
    done: int = 0

    def update(self, state: Mapping[str, Any]) -> None:
        self.bar.set_description(f"merge [{state.get('stage')}]", refresh=False)
        if state.get("total") and state["total"] != self.bar.total:
            self.bar.total = state["total"]
        step = int(state.get("done", 0)) - self.done
        if step:
            self.bar.update(step) if step > 0 else self.bar.reset()
            self.done = int(state.get("done", 0)) if step > 0 else 0


def run_on_ray(plan: MergePlan, progress: bool = True, resume: bool = True,
               wait_timeout_s: float | None = None, block_bytes: int = BLOCK_BYTES) -> MergeResult:
    """Run a validated plan on Ray: workers + coordinator actors; the driver shows progress.
    `block_bytes`: tensors above it (float32) are merged in row blocks of about this size."""
    spec = plan.spec
    with ray_session(spec.runtime, plan.n_experts):
        cluster = ray.cluster_resources()
        opts = worker_options(spec.runtime, cluster)
        if spec.runtime.device == "cuda" and not opts["num_gpus"]:
            raise SpecError("field `runtime.device`: 'cuda' but the expert workers get no GPU "
                            f"(runtime.num_gpus_per_worker={spec.runtime.num_gpus_per_worker}, "
                            f"cluster GPUs {cluster.get('GPU', 0):g}); set num_gpus_per_worker or use 'auto'")
        missing = shortfall(opts, plan.n_experts, cluster)
        if missing:
            log.warning("the cluster cannot hold %d expert workers right now (%s); waiting for an "
                        "autoscaler, or lower runtime.num_cpus_per_worker / num_gpus_per_worker",
                        plan.n_experts, "; ".join(missing))
        job_id = f"merge-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        level = logging.getLogger("esm_ray").getEffectiveLevel()
        slow_s = float(os.environ.get(TEST_SLOW_ENV, "0") or 0)
        imports = tuple(type(m).__module__ for m in (plan.method, plan.purifier) if m is not None)
        pool = RayPool.start(spec, opts, job_id, slow_s=slow_s, log_level=level, imports=imports)
        coord = None
        try:
            info = pool.wait_ready(timeout_s=wait_timeout_s)
            nodes = len({i["node"] for i in info})
            log.info("%d expert workers up on %d node(s): %s each (job %s)", plan.n_experts, nodes,
                     ", ".join(f"{k}={v:g}" for k, v in _flat_resources(opts).items()), job_id)
            driver_node = ray.get_runtime_context().get_node_id()
            strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                driver_node, soft=is_s3(spec.output))  # a local output path lives on the driver's node
            coord = Coordinator.options(
                name=f"{job_id}-coordinator", namespace=NAMESPACE, scheduling_strategy=strategy,
                max_restarts=spec.runtime.max_restarts, max_task_retries=spec.runtime.max_restarts,
            ).remote(plan, pool.actor_names, pool.names, resume, level, block_bytes)
            return _follow(coord, coord.run.remote(), len(plan.names), progress)
        finally:
            if coord is not None:
                ray.kill(coord, no_restart=True)
            pool.close()


def _flat_resources(opts: Mapping[str, Any]) -> dict[str, float]:
    out = {"CPU": opts["num_cpus"], "GPU": opts["num_gpus"]}
    out.update(opts.get("resources") or {})
    return {k: v for k, v in out.items() if v}


def _follow(coord: Any, run_ref: Any, total: int, progress: bool) -> MergeResult:
    """Show the coordinator's progress until run() returns; re-raise its error."""
    tty = sys.stderr.isatty()
    bar = _Bar(tqdm(total=total, unit="tensor", desc="merge", disable=not progress,
                    mininterval=0.5 if tty else 10.0))
    try:
        while True:
            ready, _ = ray.wait([run_ref], timeout=0.5)
            if ready:
                break
            try:
                bar.update(ray.get(coord.progress.remote(), timeout=5))
            except (GetTimeoutError, RayActorError):
                pass  # restarting or busy; the next poll will tell
        try:
            result = ray.get(run_ref)
        except RayTaskError as err:
            cause = _cause(err)
            if isinstance(cause, (EsmRayError, RuntimeError)) and not isinstance(cause, RayTaskError):
                raise cause from None
            raise
        except RayActorError as err:
            raise RuntimeError("the coordinator died and could not be restarted; submit the job again "
                               f"to resume from its staged groups ({err})") from None
        bar.update({"stage": "done", "done": total, "total": total})
        return result
    finally:
        bar.bar.close()

"""A 1B-class ESM merge with every process that computes capped below one expert's bf16 size.

    python benchmarks/scale_run.py [--experts 4] [--cap-mb 1700] [--coordinator-cap-mb 1700]
        [--local-cap-mb 1700] [--runtimes local,ray] [--samples 8] [--max-length 32] [--layers N]

The base is benchmarks/simple_merge.py's `1b` case (LLaMA-shaped, 953M parameters, bf16 on
disk: 1.9 GB per model, 3.8 GB in float32), with T experts (base + a random rank-16 update +
noise; benchmarks/_util.py, cached). Each expert gets its own random token rows. ESM merges
them with `calibration.mode: layerwise`, once with the local runtime and once on a private
local Ray (one ExpertWorker actor per expert, 1 CPU each, so two compute at once on two
cores), each with an empty statistics cache, 1 math thread, bf16 output. `--layers N` keeps
the 1B widths with N blocks (a quick run).

The memory caps are Linux memory cgroups (v1 `memory.limit_in_bytes`, or v2 `memory.max`):
- Ray: every ExpertWorker actor process is moved into a cgroup of its own of `--cap-mb`, and
  the Coordinator actor into one of `--coordinator-cap-mb` (both 1700 MiB by default: below
  one expert's 1818 MiB in bf16), as soon as it appears. On cgroup v1 without charge moving,
  what it allocated before (the Ray worker and its imports) stays charged outside; its peak
  below counts everything. The driver and Ray's daemons are not capped; their peaks are printed.
- local: the whole merge process is in one cgroup of `--local-cap-mb` (1700 MiB by default): it
  holds the coordinator, the writer and every expert side.
A cgroup counts file pages too (reading the models through mmap); the kernel drops those
under the cap, and kills the process (an "OOM kill", counted) only when its own memory does
not fit. Where no cgroup can be created (not root, no controller) the run goes on uncapped
and says so; the peak resident set (anonymous memory, which excludes mapped model files) is
measured either way, every 0.2 s, and written each second to `rss-<runtime>.csv` in the working
directory (to place the peaks against the merge log's times).

Prints per run the stage times from merge_report.json, the wall time and the peaks, then
whether the local and Ray outputs are the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _util import cache_root, clean_env, compare_dirs, disk_free, make_llama_family, print_table  # noqa: E402
from ray_scaling import write_data  # noqa: E402
from simple_merge import ONE_B  # noqa: E402

MB = 1 << 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- memory cgroups ----------------------------------------------------------------------------

class MemCgroup:
    """One memory cgroup with a hard limit (v1 or v2), removed by close(); None where none can be made."""

    def __init__(self, path: Path, v2: bool) -> None:
        self.path, self.v2 = path, v2

    @classmethod
    def make(cls, name: str, limit: int) -> MemCgroup | None:
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "memory" in v2.read_text().split():
            path, files = v2.parent / name, {"memory.max": limit, "memory.swap.max": 0}
        elif Path("/sys/fs/cgroup/memory/cgroup.procs").exists():
            path, files = Path("/sys/fs/cgroup/memory") / name, {"memory.limit_in_bytes": limit}
        else:
            return None
        try:
            path.mkdir(exist_ok=True)
            for f, v in files.items():
                (path / f).write_text(str(v))
        except OSError:
            if path.exists():
                path.rmdir()
            return None
        try:  # v1: a process's anonymous pages move with it into the group, where the kernel allows it
            (path / "memory.move_charge_at_immigrate").write_text("1")
        except OSError:
            pass
        return cls(path, "memory.max" in files)

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def oom_kills(self) -> int:
        f = self.path / ("memory.events" if self.v2 else "memory.oom_control")
        for line in f.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


# ---- peaks per process role ---------------------------------------------------------------------

def _role(p: psutil.Process, root_pid: int) -> str | None:
    if p.pid == root_pid:
        return "merge process"
    try:
        cmd = " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    for actor in ("ExpertWorker", "Coordinator"):
        if cmd.startswith(f"ray::{actor}"):
            return actor
    return None


def _anon_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Watcher(threading.Thread):
    """Polls the process tree of one merge: caps each new ExpertWorker (Ray) and records every
    role's peak anonymous RSS (max over its processes)."""

    def __init__(self, proc: subprocess.Popen, cap: int, cap_workers: bool, name: str,
                 coordinator_cap: int | None = None) -> None:
        super().__init__(daemon=True)
        self.proc, self.cap, self.cap_workers, self.name = proc, cap, cap_workers, name
        self.caps = {"ExpertWorker": cap if cap_workers else None,
                     "Coordinator": coordinator_cap if cap_workers else None}
        self.peaks: dict[str, int] = {}
        self.pids: dict[str, set[int]] = {}
        self.groups: list[MemCgroup] = []
        self.uncapped: list[int] = []
        self.timeline: list[tuple[float, str, int, float]] = []  # (s since start, role, pid, MiB), each second
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return
        t0, last = time.perf_counter(), -1.0
        while not self.stop.is_set() and self.proc.poll() is None:
            now = time.perf_counter() - t0
            sample = now - last >= 1.0
            if sample:
                last = now
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                role = _role(p, root.pid)
                if role is None:
                    continue
                if p.pid not in self.pids.setdefault(role, set()):
                    self.pids[role].add(p.pid)
                    limit = self.caps.get(role)
                    if limit is not None:
                        g = MemCgroup.make(f"{self.name}-{role[0].lower()}{p.pid}", limit)
                        if g is None:
                            self.uncapped.append(p.pid)
                        else:
                            g.add(p.pid)
                            self.groups.append(g)
                            log(f"{role} pid {p.pid} capped at {limit / MB:.0f} MiB ({g.path})")
                rss = _anon_rss(p.pid)
                self.peaks[role] = max(self.peaks.get(role, 0), rss)
                if sample:
                    self.timeline.append((round(now, 1), role, p.pid, round(rss / MB, 1)))
            self.stop.wait(0.2)


# ---- one merge ----------------------------------------------------------------------------------

def run_merge(spec: dict, work: Path, runtime: str, cap: int, local_cap: int,
              coordinator_cap: int | None = None) -> dict:
    spec_path = work / f"spec-{runtime}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log_path = work / f"merge-{runtime}.log"
    env = clean_env(1)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    name = f"esm-ray-scale-{os.getpid()}-{runtime}"
    own = MemCgroup.make(name, local_cap) if runtime == "local" else None
    t0 = time.perf_counter()
    with open(log_path, "wb") as fo:
        proc = subprocess.Popen([sys.executable, "-m", "esm_ray.cli", "merge", str(spec_path)],
                                stdout=fo, stderr=subprocess.STDOUT, env=env)
        if own is not None:
            own.add(proc.pid)  # before it has imported anything
        watch = Watcher(proc, cap, runtime == "ray", name, coordinator_cap)
        watch.start()
        rc = proc.wait()
        watch.stop.set()
        watch.join()
    wall = time.perf_counter() - t0
    with open(work / f"rss-{runtime}.csv", "w") as f:  # where the peaks fall, against the merge log
        f.write("seconds,role,pid,anon_rss_mib\n")
        f.writelines(f"{t},{role},{pid},{mib}\n" for t, role, pid, mib in watch.timeline)
    groups = ([own] if own else []) + watch.groups
    res = {"runtime": runtime, "rc": rc, "wall_s": wall, "log": str(log_path),
           "capped": (own is not None) if runtime == "local" else (bool(watch.groups) and not watch.uncapped),
           "oom_kills": sum(g.oom_kills() for g in groups),
           "workers": len(watch.pids.get("ExpertWorker", ())),
           "peaks_mb": {k: v / MB for k, v in watch.peaks.items()}}
    for g in groups:
        g.close()
    if rc != 0:
        res["tail"] = log_path.read_text(errors="replace")[-3000:]
        return res
    rep = json.loads((Path(spec["output"]) / "merge_report.json").read_text())
    res["timings_s"] = rep["timings_s"]
    res["restarts"] = log_path.read_text(errors="replace").count("restarted")
    return res


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: the 1b case's 16)")
    ap.add_argument("--cap-mb", type=int, default=1700, help="memory cap of each Ray expert worker, MiB")
    ap.add_argument("--coordinator-cap-mb", type=int, default=1700,
                    help="memory cap of the Ray coordinator actor, MiB (0: not capped)")
    ap.add_argument("--local-cap-mb", type=int, default=1700, help="memory cap of the local merge process, MiB")
    ap.add_argument("--runtimes", default="local,ray")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    args = ap.parse_args(argv)

    shape = ONE_B if args.layers is None else dataclasses.replace(ONE_B, name=f"llama-1b-l{args.layers}",
                                                                  layers=args.layers)
    fam = make_llama_family(shape, args.experts, log=log)
    expert_bf16 = (fam.experts[0] / "model.safetensors").stat().st_size
    cap = args.cap_mb * MB
    log(f"{shape.name}: {shape.n_params / 1e6:.0f}M parameters, one expert {expert_bf16 / MB:.0f} MiB in bf16 "
        f"({4 * shape.n_params / MB:.0f} MiB float32); caps: {args.cap_mb} MiB per Ray worker, "
        f"{args.coordinator_cap_mb or 'none'} MiB for the Ray coordinator, {args.local_cap_mb} MiB for the local process")
    work = Path(args.work or tempfile.mkdtemp(prefix="esm-ray-scale-", dir=cache_root()))
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(work / "data", args.experts, shape.vocab, args.samples, args.max_length)
    results, outs = [], {}
    try:
        for runtime in args.runtimes.split(","):
            out, stats = work / f"out-{runtime}", work / f"stats-{runtime}"
            shutil.rmtree(stats, ignore_errors=True)
            spec = {"base": str(fam.base),
                    "experts": [{"name": f"e{i}", "model": str(p), "data": str(d)}
                                for i, (p, d) in enumerate(zip(fam.experts, data))],
                    "method": {"name": "esm"},
                    "calibration": {"samples": args.samples, "max_length": args.max_length,
                                    "batch_size": args.batch_size, "mode": "layerwise", "cache_dir": str(stats)},
                    "runtime": {"name": runtime, "num_cpus_per_worker": 1},
                    "output": str(out), "dtype": "bfloat16", "overwrite": True}
            log(f"{runtime}: merging ({disk_free(work) / 1e9:.0f} GB free)")
            res = run_merge(spec, work, runtime, cap, args.local_cap_mb * MB,
                            args.coordinator_cap_mb * MB if args.coordinator_cap_mb else None)
            log(f"{runtime}: exit {res['rc']} in {res['wall_s']:.0f}s, peaks {res['peaks_mb']}, "
                f"OOM kills {res['oom_kills']}")
            if res["rc"] != 0:
                print(res["tail"], file=sys.stderr)
            else:
                outs[runtime] = out
                res["digest"] = digest(out)
            results.append(res)
            shutil.rmtree(stats, ignore_errors=True)  # tens of GB of float64 Grams at 1B
    finally:
        if args.work is None:
            for d in work.glob("stats-*"):
                shutil.rmtree(d, ignore_errors=True)

    stages = sorted({k for r in results for k in r.get("timings_s", {})} - {"total"})
    rows = []
    for r in results:
        row = {"runtime": r["runtime"], "exit": r["rc"], "capped": "yes" if r["capped"] else "NO",
               "OOM kills": r["oom_kills"], "wall s": r["wall_s"], "digest": r.get("digest", "-")}
        row.update({f"{s} s": r.get("timings_s", {}).get(s) for s in stages})
        for role in ("merge process", "ExpertWorker", "Coordinator"):
            row[f"{role} peak MiB"] = r["peaks_mb"].get(role)
        rows.append(row)
    print(f"\n{shape.name} ({shape.n_params / 1e6:.0f}M parameters, {shape.layers} blocks), T = {args.experts}, "
          f"ESM (defaults), layer-wise calibration on {args.samples} x {args.max_length} tokens per expert, "
          f"1 math thread; one expert = {expert_bf16 / MB:.0f} MiB in bf16, {4 * shape.n_params / MB:.0f} MiB in "
          f"float32; caps: {args.cap_mb} MiB per Ray worker, "
          f"{f'{args.coordinator_cap_mb} MiB' if args.coordinator_cap_mb else 'none'} for the Ray coordinator, "
          f"{args.local_cap_mb} MiB for the local process; "
          "peaks are anonymous RSS (max over a role's processes)\n")
    cols = [(k, k) for k in rows[0]] if rows else []
    print_table(rows, cols)
    if len(outs) == 2:
        a, b = outs.values()
        cmp = compare_dirs(a, b)
        same = results[0].get("digest") == results[1].get("digest")
        print(f"\nlocal vs Ray: {'the same bytes' if same else 'DIFFERENT'} "
              f"(max |diff| {cmp.get('max_abs_diff')}, {cmp.get('elements_differing')} elements differ)")
        return 0 if same and all(r["rc"] == 0 and r["oom_kills"] == 0 for r in results) else 1
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

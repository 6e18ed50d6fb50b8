"""Helpers shared by the benchmark scripts: synthetic model families, timed subprocesses with
peak RSS, the read floor, output comparison and table printing.

Nothing here imports esm_ray: the benchmarks time the package from the outside, in a fresh
process per run, the way a user runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

FORMAT_VERSION = 1  # bump when the generated weights change, so cached families are rebuilt


def cache_root() -> Path:
    """Where generated models, the mergekit venv and run outputs live (never in the repo)."""
    env = os.environ.get("ESM_RAY_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "esm-ray" / "bench"


def disk_free(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


# ---- synthetic LLaMA families ----------------------------------------------------------------

@dataclass(frozen=True)
class LlamaShape:
    """The few LlamaConfig fields that fix the tensor shapes."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    rope_theta: float = 10000.0
    max_positions: int = 2048

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "num_hidden_layers": self.layers,
            "intermediate_size": self.intermediate, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.hidden // self.heads,
            "vocab_size": self.vocab, "tie_word_embeddings": self.tied,
            "max_position_embeddings": self.max_positions, "rope_theta": self.rope_theta,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "initializer_range": 0.02,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16", "use_cache": True,
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every weight, in the order safetensors stores them (by name)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * (self.hidden // self.heads)
        out = [("model.embed_tokens.weight", (self.vocab, h)), ("model.norm.weight", (h,))]
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, h)))
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
        return sorted(out)

    @property
    def n_params(self) -> int:
        return sum(_numel(s) for _, s in self.tensors())

    @property
    def nbytes(self) -> int:
        """One model in bfloat16."""
        return 2 * self.n_params


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _seed(*parts: object) -> int:
    key = "\x00".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def _write_safetensors(path: Path, items: list[tuple[str, tuple[int, ...]]], make) -> None:
    """Write a bf16 safetensors file tensor by tensor: `make(name, shape)` returns each tensor."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in items:
        n = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in items:
            t = make(name, shape).to(torch.bfloat16).contiguous()
            f.write(t.view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Family:
    """A base and T experts: HF directories with config.json and model.safetensors."""

    shape: LlamaShape
    root: Path
    n_experts: int

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def experts(self) -> list[Path]:
        return [self.root / f"expert_{i}" for i in range(self.n_experts)]


def family_key(shape: LlamaShape, rank: int, scale: float, noise: float) -> str:
    doc = json.dumps({"shape": asdict(shape), "rank": rank, "scale": scale, "noise": noise,
                      "v": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:12]


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_llama_family(shape: LlamaShape, n_experts: int, root: Path | None = None, rank: int = 16,
                      scale: float = 2e-3, noise: float = 2e-4, log=print, in_child: bool = True) -> Family:
    """Generate (or reuse) a base and `n_experts` experts of this shape, at benchmark sizes.

    Streamed to disk tensor by tensor in bfloat16 and cached by shape, so a 1B family needs no
    model in memory; the tests' tiny Hugging Face families (which the smoke runs reuse) are
    tests/fixtures/family.py's make_family.

    base: N(0, 0.02) matrices, norms around 1. expert i: base + a random rank-`rank` update
    with entries of std about `scale`, + N(0, noise) everywhere. All stored in bfloat16.
    Expert i is the same whatever T, so T = 4 and T = 8 share their first four experts.

    What is missing is generated in a child process (`in_child`): generating reads the base
    through a memory map, whose pages count in this process's peak RSS, and a timed child
    inherits its parent's peak in ru_maxrss through exec, so every later measurement would
    report at least that.
    """
    parent = root
    root = (root or cache_root() / "models") / f"{shape.name}-{family_key(shape, rank, scale, noise)}"
    fam = Family(shape, root, n_experts)
    items = shape.tensors()
    cfg = json.dumps(shape.config(), indent=2)

    def done(d: Path) -> bool:
        return (d / "model.safetensors").is_file() and (d / "config.json").is_file()

    def base_tensor(name: str, sh: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed("base", name))
        if len(sh) == 1:
            return 1.0 + 0.05 * torch.randn(sh, generator=g)
        return 0.02 * torch.randn(sh, generator=g)

    todo = [d for d in [fam.base, *fam.experts] if not done(d)]
    if todo:
        need = len(todo) * shape.nbytes
        if disk_free(root) < need + (2 << 30):
            raise SystemExit(f"not enough disk for {len(todo)} models of {shape.nbytes / 1e9:.2f} GB under {root}")
    if todo and in_child:
        import multiprocessing

        child = multiprocessing.get_context("spawn").Process(
            target=make_llama_family, args=(shape, n_experts, parent, rank, scale, noise),
            kwargs={"log": _log_stderr, "in_child": False})
        child.start()
        child.join()
        if child.exitcode:
            raise SystemExit(f"generating the models under {root} failed (exit {child.exitcode})")
        return fam
    threads = torch.get_num_threads()
    for d in todo:
        t0 = time.perf_counter()
        d.mkdir(parents=True, exist_ok=True)
        if d == fam.base:
            _write_safetensors(d / "model.safetensors", items, base_tensor)
        else:
            from safetensors import safe_open

            idx = int(d.name.rsplit("_", 1)[1])
            with safe_open(str(fam.base / "model.safetensors"), "pt") as b:
                def expert_tensor(name: str, sh: tuple[int, ...]) -> torch.Tensor:
                    g = torch.Generator().manual_seed(_seed("expert", idx, name))
                    w = b.get_tensor(name).float()
                    if len(sh) == 2:
                        r = min(rank, *sh)
                        u = torch.randn(sh[0], r, generator=g)
                        v = torch.randn(r, sh[1], generator=g) * (scale / r ** 0.5)
                        w += u @ v
                    w += noise * torch.randn(sh, generator=g)
                    return w
                _write_safetensors(d / "model.safetensors", items, expert_tensor)
        (d / "config.json").write_text(cfg)
        log(f"  generated {d} in {time.perf_counter() - t0:.1f}s")
    torch.set_num_threads(threads)
    return fam


# ---- timed subprocesses ----------------------------------------------------------------------

@dataclass
class Run:
    wall: float      # seconds, process start to exit
    cpu: float       # seconds of CPU, user + system (robust to other load on the machine)
    peak_rss: int    # bytes, the child's peak resident set (its own and its waited-for children)
    rc: int
    out: str
    err: str


def run_timed(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
              log_dir: Path | None = None) -> Run:
    """Run `cmd`, wait with wait4 to get this child's own rusage (ru_maxrss)."""
    log_dir = Path(log_dir or cache_root() / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    out_p, err_p = log_dir / "last.out", log_dir / "last.err"
    with open(out_p, "wb") as fo, open(err_p, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=fo, stderr=fe, env=env, cwd=cwd)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024, proc.returncode,
               out_p.read_text(errors="replace"), err_p.read_text(errors="replace"))


def clean_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# ---- the read floor ---------------------------------------------------------------------------

# Reads every input tensor exactly once (safetensors) and sums each name into float32. With
# `--write DIR` it also streams the sums, cast to bfloat16, into one safetensors file in DIR as
# they are made (the header first, from the inputs' shapes) and fsyncs it, as a merge's durable
# output is written: the floor of a merge of these inputs into one model.
FLOOR_CODE = r"""
import json, os, struct, sys, time
t0 = time.perf_counter()
import torch
from safetensors import safe_open
t1 = time.perf_counter()
args = sys.argv[1:]
out = None
if args and args[0] == "--write":
    out, args = args[1], args[2:]
files = [safe_open(p + "/model.safetensors", "pt") for p in args]
names = list(files[0].keys())
fh = None
if out is not None:
    header, off = {}, 0
    for name in names:
        shape = list(files[0].get_slice(name).get_shape())
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    os.makedirs(out, exist_ok=True)
    fh = open(os.path.join(out, "model.safetensors"), "wb")
    fh.write(struct.pack("<Q", len(head)) + head)
total, write_s = 0.0, 0.0
for name in names:
    acc = files[0].get_tensor(name).float()
    for f in files[1:]:
        acc += f.get_tensor(name).float()
    total += float(acc.view(-1)[0])
    if fh is not None:
        tw = time.perf_counter()
        fh.write(memoryview(acc.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()))
        write_s += time.perf_counter() - tw
    del acc
if fh is not None:
    tw = time.perf_counter()
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    write_s += time.perf_counter() - tw
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "read_sum_s": t2 - t1 - write_s, "write_s": write_s, "check": total}))
"""


def floor_cmd(python: str, dirs: Iterable[Path], write: Path | None = None) -> list[str]:
    return [python, "-c", FLOOR_CODE, *(["--write", str(write)] if write is not None else []), *map(str, dirs)]


# ---- comparing outputs -----------------------------------------------------------------------

def _open_dir(d: Path) -> dict[str, Any]:
    """{tensor name: open safetensors handle} over every .safetensors file of a directory."""
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        h = safe_open(str(f), "pt")
        out.update({k: h for k in h.keys()})
    return out


def compare_dirs(a: Path, b: Path) -> dict[str, Any]:
    """Max |a - b| over the tensors both hold, how many elements differ, names only one has.
    Reads one tensor pair at a time."""
    ha, hb = _open_dir(a), _open_dir(b)
    common = sorted(set(ha) & set(hb))
    worst, worst_name, n_diff, n_all, dtypes = 0.0, "", 0, 0, set()
    for k in common:
        x, y = ha[k].get_tensor(k), hb[k].get_tensor(k)
        dtypes.add(f"{x.dtype}/{y.dtype}".replace("torch.", ""))
        if x.shape != y.shape:
            return {"error": f"{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}"}
        d = (x.float() - y.float()).abs()
        m = float(d.max()) if d.numel() else 0.0
        n_diff += int((d != 0).sum())
        n_all += d.numel()
        if m > worst:
            worst, worst_name = m, k
    return {"max_abs_diff": worst, "at": worst_name, "elements_differing": n_diff, "elements": n_all,
            "only_a": sorted(set(ha) - set(hb)), "only_b": sorted(set(hb) - set(ha)),
            "dtypes": sorted(dtypes)}


def ties_ties(a: Path, b: Path, base: Path, experts: Sequence[Path], density: float) -> dict[str, int]:
    """Where two TIES outputs differ, whether some expert has |τ| exactly at its trim threshold.

    TIES keeps the k largest |τ|; when several entries tie at the k-th value, which of them are
    kept is a convention (esm-ray: lowest index first; mergekit: an unstable argsort). Such
    choices change the result only at the tied entries, so differences elsewhere would be bugs.
    Returns {"differing": n, "at_threshold_ties": m} (n == m when all are explained).
    """
    ha, hb, h0 = _open_dir(a), _open_dir(b), _open_dir(base)
    he = [_open_dir(e) for e in experts]
    differing = explained = 0
    for k in sorted(set(ha) & set(hb)):
        diff = ha[k].get_tensor(k) != hb[k].get_tensor(k)
        nd = int(diff.sum())
        if not nd:
            continue
        differing += nd
        w0 = h0[k].get_tensor(k).float().reshape(-1)
        tie = torch.zeros(w0.numel(), dtype=torch.bool)
        for h in he:
            mag = (h[k].get_tensor(k).float().reshape(-1) - w0).abs()
            n = mag.numel()
            keep = min(n, max(1, int(density * n)))
            if keep < n:
                tie |= mag == torch.kthvalue(mag, n - keep + 1).values
        explained += int((diff.reshape(-1) & tie).sum())
    return {"differing": differing, "at_threshold_ties": explained}


# ---- tables ----------------------------------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.{digits}f}"
    return str(v)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], file=sys.stdout) -> str:
    """Print a Markdown table of `rows` with (key, header) columns; return the text."""
    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for c in cells:
        lines.append("| " + " | ".join(x.rjust(w) if i > 2 else x.ljust(w)
                                        for i, (x, w) in enumerate(zip(c, widths))) + " |")
    text = "\n".join(lines)
    print(text, file=file)
    return text

"""`esm-ray mergekit CONFIG OUT_DIR [flags]`: mergekit-yaml's command line, run by esm-ray.

mergekit-yaml's flags that mean something here are honoured (`--cuda`, `--device`,
`--out-shard-size`, `--random-seed`); those that only tune mergekit's own execution are
accepted and ignored with a warning; those esm-ray cannot honour and any unknown flag stop
with exit 2 naming the flag. esm-ray's own `--dry-run`, `--overwrite`, `--runtime`,
`--address` and `--no-progress` work as in `esm-ray merge`.
"""

from __future__ import annotations

import argparse
import logging
import re

from esm_ray.errors import SpecError

log = logging.getLogger("esm_ray.mergekit")

# Flags (and their --no- forms) that only tune how mergekit runs: nothing to do here.
IGNORED = {"--allow-crimes", "--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu", "--multi-gpu", "--gpu-rich",
           "--async-write", "--clone-tensors", "--copy-tokenizer", "--write-model-card", "--safe-serialization",
           "--trust-remote-code", "--quiet", "--verbose", "-v", "-vv", "-vvv"}
IGNORED_VALUE = {"--write-threads", "--num-threads", "--transformers-cache", "--lora-merge-cache",
                 "--lora-merge-dtype"}
REFUSED = {"--unsafe-truncate-embeddings": "esm-ray never truncates embeddings: merge models that share a vocabulary",
           "--no-safe-serialization": "esm-ray writes safetensors only",
           "--no-copy-tokenizer": "esm-ray always writes the tokenizer files with the model"}
_PARAMS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMB]?)\s*$", re.IGNORECASE)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("mergekit", help="run a mergekit YAML as mergekit-yaml would",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="mergekit YAML configuration")
    p.add_argument("out_dir", help="output directory or s3:// prefix")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="mergekit-yaml's flags")
    p.set_defaults(func=cmd_mergekit)


def shard_bytes(value: str, dtype: str | None) -> int:
    """mergekit's --out-shard-size (parameters, with K/M/B) in bytes of the output dtype."""
    m = _PARAMS.match(value)
    if not m:
        raise SpecError(f"--out-shard-size {value!r}: expected a number of parameters such as 5B or 500M")
    n = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m.group(2).upper()]
    return max(1024, int(n * (4 if dtype in (None, "float32") else 2)))


def parse_flags(flags: list[str]) -> tuple[argparse.Namespace, dict]:
    """(esm-ray merge options, spec overrides) from mergekit-yaml's flags."""
    ns = argparse.Namespace(dry_run=False, overwrite=False, runtime=None, address=None, no_progress=False,
                            output=None)
    over: dict = {}
    runtime: dict = {}
    i = 0

    def value(flag: str) -> str:
        nonlocal i
        if "=" in flags[i]:
            return flags[i].split("=", 1)[1]
        if i + 1 >= len(flags):
            raise SpecError(f"{flag}: needs a value")
        i += 1
        return flags[i]

    while i < len(flags):
        arg = flags[i]
        flag = arg.split("=", 1)[0]
        if flag in REFUSED:
            raise SpecError(f"{flag}: not supported: {REFUSED[flag]}")
        if flag in ("--dry-run", "--overwrite", "--no-progress"):
            setattr(ns, flag[2:].replace("-", "_"), True)
        elif flag in ("--runtime", "--address"):
            setattr(ns, flag[2:], value(flag))
        elif flag == "--cuda":
            runtime["device"] = "cuda"
        elif flag == "--no-cuda":
            pass
        elif flag == "--device":
            dev = value(flag)
            if dev not in ("cpu", "cuda", "auto") and not dev.startswith("cuda:"):
                raise SpecError(f"--device {dev!r}: esm-ray runs on cpu, cuda or auto")
            runtime["device"] = "cuda" if dev.startswith("cuda") else dev
        elif flag == "--random-seed":
            over["seed"] = int(value(flag))
        elif flag == "--out-shard-size":
            over["_shard"] = value(flag)
        elif flag in IGNORED or (flag.startswith("--no-") and "--" + flag[5:] in IGNORED):
            log.warning("%s: mergekit-yaml option without effect in esm-ray; ignored", flag)
        elif flag in IGNORED_VALUE:
            value(flag)
            log.warning("%s: mergekit-yaml option without effect in esm-ray; ignored", flag)
        else:
            raise SpecError(f"{flag}: unknown option of `esm-ray mergekit` (mergekit-yaml's options are "
                            "accepted where they apply; see docs/methods-classic.md)")
        i += 1
    if runtime:
        over["runtime"] = runtime
    return ns, over


def cmd_mergekit(args: argparse.Namespace) -> int:
    """Translate the flags, then run the config as `esm-ray merge` does (`args.merge_cmd`, set
    by the top-level parser)."""
    from esm_ray.compat.mergekit import load_config

    ns, over = parse_flags(args.flags)
    shard = over.pop("_shard", None)
    if shard is not None:
        probe = load_config(args.config, args.out_dir)
        over["shard_size"] = shard_bytes(shard, probe.dtype)
    ns.spec = args.config
    ns.output = args.out_dir
    ns.mergekit_overrides = over
    return int(args.merge_cmd(ns))

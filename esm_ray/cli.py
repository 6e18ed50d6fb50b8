"""`esm-ray`: merge, inspect methods, build the test bed, evaluate, serve, submit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from esm_ray.errors import EsmRayError

log = logging.getLogger("esm_ray")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-5s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("botocore", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _is_mergekit(path: str) -> bool:
    """Whether a YAML spec file is a mergekit configuration (it names `merge_method`)."""
    from pathlib import Path

    import yaml

    p = Path(path)
    if p.suffix == ".json" or not p.is_file():
        return False
    try:
        raw = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError):
        return False  # load_spec reports it
    return isinstance(raw, dict) and "merge_method" in raw


def cmd_merge(args: argparse.Namespace) -> int:
    from esm_ray.runtime import build_plan, run_merge
    from esm_ray.spec import load_spec

    if _is_mergekit(args.spec):
        from esm_ray.compat.mergekit import load_config

        spec = load_config(args.spec, args.output, getattr(args, "mergekit_overrides", None))
    else:
        spec = load_spec(args.spec)
    updates = {}
    if args.output:
        updates["output"] = args.output
    if args.overwrite:
        updates["overwrite"] = True
    if args.runtime:
        updates["runtime"] = spec.runtime.model_copy(update={"name": args.runtime})
    if args.address:
        updates["runtime"] = updates.get("runtime", spec.runtime).model_copy(update={"address": args.address})
    if updates:
        spec = spec.model_copy(update=updates)
    plan = build_plan(spec)
    if args.dry_run:
        from esm_ray.runtime.resolved import resolved_lines

        print(plan.describe())
        for line in resolved_lines(plan):
            print(line)
        print("dry run: spec and inputs are valid; nothing was computed")
        return 0
    result = run_merge(spec, progress=not args.no_progress, plan=plan)
    print(f"output: {result.output}")
    for stage, secs in result.timings.items():
        print(f"  {stage:<14} {secs:8.2f} s")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from esm_ray.methods import METHODS, PURIFIERS
    from pydantic import ValidationError

    from esm_ray.errors import SpecError
    from esm_ray.methods.base import Needs, describe_params
    from esm_ray.spec import RescaleSpec

    rows = [("method", cls) for cls in METHODS.values()] + [("purifier", cls) for cls in PURIFIERS.values()]

    def needs(cls) -> list[str]:  # with default parameters (a routed method adds its base method's)
        try:
            return cls(cls.Params(), n_experts=2).needs().describe()
        except (SpecError, ValidationError):  # a required parameter, or a fixed number of experts
            return Needs(stats=cls.needs_stats, data=getattr(cls, "needs_data", False),
                         heads=getattr(cls, "needs_heads", False),
                         labels=getattr(cls, "needs_labels", False)).describe()

    def lora(kind: str, cls) -> str | None:  # how LoRA experts are merged (io.adapter)
        if kind != "method":
            return None
        if getattr(cls, "output_kind", "static") == "routed":  # methods.esm_pp: residual_of
            return "routed as themselves (residual_of: base)"
        return "factored" if getattr(cls, "factored", False) else "densified per tensor"

    rescale = ("the spec's `rescale`, after any method: each calibrated linear layer's update times the "
               "least-squares factor that best reproduces the experts' own output shifts (on by default "
               "for ESM when every expert is a LoRA adapter)")
    if args.json:
        doc = {cls.name: {"kind": kind, "summary": cls.summary, "needs": needs(cls), "lora": lora(kind, cls),
                          "params": [p.__dict__ for p in describe_params(cls.Params)]} for kind, cls in rows}
        doc["rescale"] = {"kind": "spec field", "summary": rescale, "needs": ["calibration data"], "lora": None,
                          "params": [p.__dict__ for p in describe_params(RescaleSpec)]}
        print(json.dumps(doc, indent=2, default=str))
        return 0
    for kind, cls in sorted(rows, key=lambda r: (r[0] != "method", r[1].name)):
        n = needs(cls)
        tags = [kind] + (["LoRA " + lora(kind, cls)] if kind == "method" else []) + (["needs " + ", ".join(n)] if n else [])
        _print_entry(cls.name, tags, cls.summary, describe_params(cls.Params))
    _print_entry("rescale", ["spec field", "needs calibration data"], rescale, describe_params(RescaleSpec))
    return 0


def _print_entry(name: str, tags: list[str], summary: str, params: list) -> None:
    """One entry of `esm-ray methods`: its name, tags and summary, then a line per parameter."""
    print(f"{name}  [{', '.join(tags)}]  {summary}")
    for p in params:
        print(f"    {p.name:<18} {p.type:<14} default={p.default!r:<10} {p.description}")


def merge_to_output(spec) -> str:
    """Run a merge spec; its output location (what `esm-ray eval --sweep` merges with)."""
    from esm_ray.runtime import run_merge

    return str(run_merge(spec).output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esm-ray", description=__doc__)
    parser.set_defaults(merge_fn=merge_to_output, merge_cmd=cmd_merge)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="run a merge job from a YAML/JSON spec")
    p.add_argument("spec", help="merge spec file")
    p.add_argument("--dry-run", action="store_true", help="validate the spec and every input, compute nothing")
    p.add_argument("--output", help="override the spec's output location")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--runtime", choices=["local", "ray"], help="override the spec's executor")
    p.add_argument("--address", help="Ray address for --runtime ray (auto, ray://host:10001, local)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    for module in ("esm_ray.compat.cli", "esm_ray.zoo.cli", "esm_ray.eval.cli", "esm_ray.serve.cli", "esm_ray.runtime.cli",
                   "esm_ray.demo"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith(module.rsplit(".", 1)[0]):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args) or 0)
    except EsmRayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was committed", file=sys.stderr)
        return 130


def _teardown_skippable() -> bool:
    """Whether nothing is left for the interpreter's teardown but freeing memory: Ray never
    imported (no cluster or driver to stop), no other non-daemon thread and no child process."""
    import threading

    if "ray" in sys.modules:
        return False
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return False
    mp = sys.modules.get("multiprocessing")
    return not (mp is not None and mp.active_children())


def run() -> None:
    """The `esm-ray` command: main(), then exit. Once a local command has finished (a merge is
    committed by then: files written, synced and renamed) and nothing else runs, the process
    leaves without the interpreter's teardown, which mostly runs torch's finalizers and takes
    about half a second; logs and output streams are flushed first."""
    rc = main()
    if _teardown_skippable():
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can reach it
                pass
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()

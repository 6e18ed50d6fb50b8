"""Ray Job entrypoint: run one merge on the cluster this job was submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.merge --spec jobs/example-ties.yaml

or `esm-ray submit jobs/example-ties.yaml --address http://127.0.0.1:8265`. The job connects
with ray.init(address="auto") (Ray sets RAY_ADDRESS for job drivers) and runs the Ray executor
whatever the spec's `runtime` says: one ExpertWorker actor per expert, one Coordinator actor.
Paths in the spec are read on the cluster: use s3:// URIs or paths every node can see.
Exit status: 0 merged, 2 invalid spec or inputs, 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

RESULT_PREFIX = "esm-ray result: "


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.merge", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="merge spec file (YAML/JSON); relative paths inside are relative to it")
    src.add_argument("--spec-json", help="the whole spec as JSON (what `esm-ray submit` sends)")
    p.add_argument("--output", help="override the spec's output location")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--address", default="auto", help="Ray address (default: auto, the job's cluster)")
    p.add_argument("--progress", action="store_true", help="progress bar in the job log")
    p.add_argument("--no-resume", action="store_true", help="do not stage finished groups for resume")
    return p


def load(args: argparse.Namespace):
    """The spec from --spec or --spec-json, with overrides, forced onto the Ray executor."""
    from esm_ray.spec import load_spec, spec_from_dict

    if args.spec:
        spec = load_spec(args.spec)
    else:
        try:
            raw = json.loads(args.spec_json)
        except (json.JSONDecodeError, RecursionError) as err:
            from esm_ray.errors import SpecError

            why = err if isinstance(err, json.JSONDecodeError) else "it nests too deeply"
            raise SpecError(f"--spec-json: not JSON: {why}") from None
        spec = spec_from_dict(raw, source="--spec-json")
    updates: dict = {"runtime": spec.runtime.model_copy(update={"name": "ray", "address": args.address})}
    if args.output:
        updates["output"] = args.output
    if args.overwrite:
        updates["overwrite"] = True
    return spec.model_copy(update=updates)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from esm_ray.errors import EsmRayError

    try:
        spec = load(args)
        import ray

        from esm_ray.runtime.plan import build_plan
        from esm_ray.runtime.ray_executor import NAMESPACE, run_on_ray

        if not ray.is_initialized():
            ray.init(address=args.address, namespace=NAMESPACE)
        plan = build_plan(spec)
        print(plan.describe(), flush=True)
        result = run_on_ray(plan, progress=args.progress, resume=not args.no_resume)
    except EsmRayError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    summary = {"output": result.output, "method": result.report.get("method"), "timings_s": result.timings,
               "resume": result.report.get("resume")}
    print(RESULT_PREFIX + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

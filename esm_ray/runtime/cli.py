"""`esm-ray submit`: run a merge spec as a Ray Job on a cluster, through its dashboard.

    esm-ray submit spec.yaml --address http://127.0.0.1:8265 [--working-dir .] [--no-wait]

Prints the job id, follows the job's log, and exits with the job's outcome (0 succeeded,
1 failed or stopped). The job runs `python -m jobs.merge` on the cluster. With --working-dir
the directory is uploaded and becomes the job's working directory; a spec inside it is passed
by its relative path (its relative paths then resolve on the cluster), any other spec is sent
whole as JSON with its paths resolved here.

Ray 2.60 clusters require a token by default. Either run with RAY_AUTH_MODE=token (the token
comes from RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token), or
pass --token-file FILE to send it as an `Authorization: Bearer` header.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

# Not uploaded with --working-dir: environments, VCS data, caches, build outputs.
WORKING_DIR_EXCLUDES = [".venv", "venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "build", "dist",
                        "out", "cache", ".esm-ray"]
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("submit", help="submit a merge spec as a Ray Job to a cluster",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="merge spec file (YAML/JSON)")
    p.add_argument("--address", help="Ray dashboard address, e.g. http://127.0.0.1:8265 "
                                     "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    p.add_argument("--working-dir", help="directory uploaded with the job (e.g. . for this checkout)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--submission-id", help="job id to use (default: esm-ray-merge-<time>-<random>)")
    p.add_argument("--output", help="override the spec's output location")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0.0,
                   help="CPUs reserved for the job's driver (the workers reserve their own)")
    p.add_argument("--token-file", help="file holding the cluster's auth token (sent as a Bearer header)")
    p.set_defaults(func=cmd_submit)


def auth_headers(token_file: str | None) -> dict[str, str]:
    """The Authorization header for --token-file; empty otherwise (Ray's client reads
    RAY_AUTH_MODE=token itself)."""
    if not token_file:
        return {}
    from esm_ray.errors import SpecError

    try:
        token = Path(token_file).expanduser().read_text().strip()
    except OSError as err:
        raise SpecError(f"--token-file {token_file}: cannot read: {err.strerror or err}") from None
    if not token:
        raise SpecError(f"--token-file {token_file}: the file is empty")
    return {"Authorization": f"Bearer {token}"}


def entrypoint(spec_path: str, working_dir: str | None, output: str | None = None,
               overwrite: bool = False) -> str:
    """The job's shell command: `python -m jobs.merge` with the spec by path or as JSON."""
    from esm_ray.spec import load_spec

    spec = load_spec(spec_path)  # validates here, before anything is uploaded
    cmd = ["python", "-m", "jobs.merge"]
    src = Path(spec_path).resolve()
    if working_dir and src.is_relative_to(Path(working_dir).resolve()):
        cmd += ["--spec", src.relative_to(Path(working_dir).resolve()).as_posix()]
    else:
        cmd += ["--spec-json", json.dumps(spec.model_dump(mode="json", exclude_none=True), separators=(",", ":"))]
    if output:
        cmd += ["--output", output]
    if overwrite:
        cmd.append("--overwrite")
    return shlex.join(cmd)


def _address(arg: str | None) -> str:
    from esm_ray.errors import SpecError

    addr = arg or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise SpecError("--address: give the cluster's dashboard address, e.g. http://127.0.0.1:8265")
    return addr if "://" in addr else f"http://{addr}"


def _jobs_error(address: str, err: Exception) -> Exception:
    from esm_ray.errors import EsmRayError

    msg = str(err)
    if any(s in msg for s in ("401", "403", "uthenticat", "Unauthorized", "Forbidden")):
        msg += ("\nthe cluster wants its token: run with RAY_AUTH_MODE=token (the token comes from "
                "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) or pass --token-file")
    return EsmRayError(f"Ray Jobs API at {address}: {msg}")


def _client(address: str, headers: dict[str, str]) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=headers or None)
    except Exception as err:  # connection refused, auth, version mismatch
        raise _jobs_error(address, err) from None


async def _tail(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def follow(client: Any, job_id: str, poll_s: float = 1.0) -> str:
    """Print the job's log until it ends; returns its final status name."""
    try:
        asyncio.run(_tail(client, job_id))
    except RuntimeError as err:  # the log stream closed early: fall back to polling
        print(f"(log stream ended: {err}; polling the status)", file=sys.stderr)
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def cmd_submit(args: argparse.Namespace) -> int:
    address = _address(args.address)
    headers = auth_headers(args.token_file)
    ep = entrypoint(args.spec, args.working_dir, args.output, args.overwrite)
    runtime_env: dict[str, Any] = {}
    if args.working_dir:
        runtime_env = {"working_dir": str(Path(args.working_dir).resolve()), "excludes": WORKING_DIR_EXCLUDES}
    job_id = args.submission_id or f"esm-ray-merge-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    client = _client(address, headers)
    try:
        client.submit_job(entrypoint=ep, runtime_env=runtime_env or None, submission_id=job_id,
                          entrypoint_num_cpus=args.entrypoint_num_cpus,
                          metadata={"tool": "esm-ray", "spec": Path(args.spec).name})
    except Exception as err:
        raise _jobs_error(address, err) from None
    print(f"submitted job {job_id} to {address}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: "
              f"ray job stop --address {address} {job_id}", file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}", flush=True)
    return TERMINAL[status]

"""Start and stop the service on a local or existing Ray cluster."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from esm_ray.serve.app import ServeOptions, build
from esm_ray.spec import ServeSpec

log = logging.getLogger("esm_ray.serve")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Running:
    """A started application: its URL and what to undo on stop."""

    url: str
    name: str
    started_ray: bool


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start(options: ServeOptions | dict[str, Any], spec: ServeSpec | None = None, *,
          max_queued_requests: int | None = None, address: str | None = None, name: str = "esm-ray",
          route_prefix: str = "/", num_cpus: int | None = None) -> Running:
    """Deploy the model and return once it answers. Starts a private Ray when none is running
    and no address is given (bound to loopback when the HTTP host is loopback)."""
    import ray
    from ray import serve

    spec = spec or ServeSpec()
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            if spec.host in LOOPBACK:
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(num_cpus=num_cpus, include_dashboard=False)
            started = True
    serve.start(http_options={"host": spec.host, "port": spec.port})
    serve.run(build(options, spec, max_queued_requests), name=name, route_prefix=route_prefix)
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    url = f"http://{host}:{spec.port}{route_prefix.rstrip('/')}"
    log.info("serving on %s", url)
    return Running(url, name, started)


def stop(running: Running) -> None:
    """Delete the application; shut Serve and Ray down if this process started them."""
    import ray
    from ray import serve

    serve.delete(running.name)
    if running.started_ray:
        serve.shutdown()
        ray.shutdown()

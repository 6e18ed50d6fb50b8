"""Start and stop the service on a local or existing Ray cluster."""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from esm_ray.serve.app import ServeOptions, build
from esm_ray.spec import ServeSpec

if TYPE_CHECKING:
    from esm_ray.serve.llm_app import LLMOptions

log = logging.getLogger("esm_ray.serve")

@dataclass
class Running:
    """A started application: its URL and what to undo on stop."""

    url: str
    name: str
    started_ray: bool


class ReplicaFailed(Exception):
    """A replica could not start for a reason that is not the input's (exit 1 at the CLI)."""


_ERROR_LINE = re.compile(r"esm_ray\.errors\.(\w+Error): (.+)")
_LAST_ERROR = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", re.M)


def _deployment_messages(name: str) -> str:
    """What Serve says about the application's deployments (a failed replica's traceback)."""
    from ray import serve

    try:
        app = serve.status().applications.get(name)
    except Exception:  # noqa: BLE001 - only used to word the error; the failure itself is reported anyway
        return ""
    if app is None:
        return ""
    return "\n".join([app.message or ""] + [d.message or "" for d in app.deployments.values()])


def replica_failure(text: str) -> Exception:
    """The cause of a failed deployment in one line: an esm-ray error (bad model directory, head,
    spec) comes back as that error class; anything else as ReplicaFailed."""
    from esm_ray import errors

    found = _ERROR_LINE.findall(text)
    if found:
        cls, msg = found[-1]
        kind = getattr(errors, cls, errors.InputError)
        return (kind if isinstance(kind, type) and issubclass(kind, errors.EsmRayError) else errors.InputError)(
            f"the model could not be served: {msg.strip()}")
    causes = _LAST_ERROR.findall(text)
    line = f"{causes[-1][0]}: {causes[-1][1].strip()}" if causes else (text.strip().splitlines() or ["no cause given"])[-1]
    return ReplicaFailed(f"the model could not be served: {line}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _application(options: Any, spec: ServeSpec, max_queued_requests: int | None, retries: int):
    """The Serve application for the options: a causal LM (LLMOptions) or the routed encoder."""
    from esm_ray.serve.llm_app import LLMOptions, build_llm

    if isinstance(options, LLMOptions):
        return build_llm(options, spec, max_queued_requests, constructor_retries=retries)
    return build(options, spec, max_queued_requests, constructor_retries=retries)


def start(options: ServeOptions | LLMOptions | dict[str, Any], spec: ServeSpec | None = None, *,
          max_queued_requests: int | None = None, address: str | None = None, name: str = "esm-ray",
          route_prefix: str = "/", num_cpus: int | None = None) -> Running:
    """Deploy the model (ServeOptions or a dict of them: the routed encoder; LLMOptions: a causal
    LM behind the OpenAI API) and return once it answers. Starts a private Ray when none is running
    and no address is given; that Ray listens on 127.0.0.1 only, whatever the HTTP host
    (esm_ray.raylocal)."""
    from esm_ray.raylocal import connect, init_private, loopback_env

    if not address:
        loopback_env()
    import ray
    from ray import serve

    spec = spec or ServeSpec()
    started = False
    if not ray.is_initialized():
        if address:
            connect(address)
        else:
            init_private(num_cpus)
            started = True
    serve.start(http_options={"host": spec.host, "port": spec.port})
    try:
        serve.run(_application(options, spec, max_queued_requests, 1), name=name,
                  route_prefix=route_prefix)
    except Exception as err:  # noqa: BLE001 - Serve reports a replica that cannot start as a long traceback
        text = f"{err}\n{_deployment_messages(name)}"
        if started:
            serve.shutdown()
            ray.shutdown()
        raise replica_failure(text) from None
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

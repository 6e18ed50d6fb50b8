"""A private Ray kept on loopback: the one place that says how esm-ray starts its own Ray.

`esm-ray merge --runtime ray` (no address) and `esm-ray serve` (no --address) start a Ray of
their own. Every listener it opens (GCS, raylet, object manager, workers, dashboard agent,
Prometheus metrics, Serve's internal gRPC) binds 127.0.0.1, never all interfaces:

- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set in the environment before Ray is imported (Ray
  reads it once, at import; a Ray already imported is patched too), so Ray and the processes
  it spawns take loopback as the node address;
- `ray.init` gets node address, dashboard host 127.0.0.1 and no dashboard;
- Ray Serve replicas bind their inter-deployment gRPC server to "[::]" unconditionally;
  `loopback_grpc()` rewrites that to 127.0.0.1 inside a replica whose node is on loopback.

This module imports nothing from esm_ray and Ray only inside functions, so every layer may use it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

LOOPBACK_IP = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_env() -> None:
    """Make a Ray started from this process bind and advertise 127.0.0.1 only. Call it before
    `import ray` where possible; for a Ray already imported the constant it read is patched."""
    os.environ[_ENV] = "0"  # for this process (read at import) and the processes Ray spawns
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def is_loopback_address(address: str | None) -> bool:
    """True for None/'local' (a private Ray) and for host:port addresses on loopback."""
    if address in (None, "", "local"):
        return True
    host = str(address).split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK_HOSTS


def init_private(num_cpus: int | None = None, **kwargs: Any) -> None:
    """Start a private, loopback-only Ray in this process (no dashboard)."""
    loopback_env()
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host=LOOPBACK_IP,
             _node_ip_address=LOOPBACK_IP, **kwargs)


def connect(address: str, **kwargs: Any) -> None:
    """Connect to an existing cluster; a loopback one stays addressed as loopback."""
    if is_loopback_address(address):
        loopback_env()  # else Ray rewrites the loopback address to this machine's network address
    import ray

    ray.init(address=address, **kwargs)


def loopback_grpc() -> bool:
    """Inside a Ray Serve replica on a loopback node: bind the replica's inter-deployment gRPC
    server to 127.0.0.1 instead of all interfaces. Returns whether it did."""
    try:
        import ray
        from ray.serve._private import replica
    except ImportError:
        return False
    try:
        node_ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside a Ray worker: nothing to bind
        return False
    if node_ip != LOOPBACK_IP or getattr(replica.add_port_to_grpc_server, "_esm_ray_loopback", False):
        return node_ip == LOOPBACK_IP
    original = replica.add_port_to_grpc_server

    def add_port(server: Any, address: str) -> Any:
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = f"{LOOPBACK_IP}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port._esm_ray_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
    return True


__all__ = ["LOOPBACK_HOSTS", "LOOPBACK_IP", "connect", "init_private", "is_loopback_address", "loopback_env",
           "loopback_grpc"]

"""Shared fixtures: tiny models on disk, a SeaweedFS S3 server, one local Ray per session.

Layout: tests/unit (core math against the oracles of tests/oracles.py, io, stats),
tests/methods (each method through the contract, golden hashes, needs), tests/integration
(real Ray, S3, HTTP, Jobs, the CLI end to end), tests/hostile (inputs and events that once went
wrong). Spec dicts come from tests/builders.py, tiny model families from tests/fixtures/family.py.

Markers beside `slow` say which real service a test uses: `ray`, `s3`, `serve`, `mergekit`.
They are added here from the fixtures a test requests (FIXTURE_MARKS), so a new test that asks
for `ray_driver` is marked `ray` without saying so; a test that starts a service by itself
marks itself. Select with e.g. `-m 'not slow and not ray'` (the default run is `-m 'not slow'`).
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray listens on 127.0.0.1 only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Calibration statistics of the test models go to a directory of this session, never to the
# user's cache (~/.cache/esm-ray or their $ESM_RAY_CACHE); subprocesses and Ray workers inherit it.
_STATS_CACHE = tempfile.mkdtemp(prefix="esm-ray-test-stats-")
os.environ["ESM_RAY_CACHE"] = _STATS_CACHE
atexit.register(shutil.rmtree, _STATS_CACHE, True)

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.lora", "tests.fixtures.s3", "tests.fixtures.ray", "tests.fixtures.mergekit",
                  "tests.fixtures.lm_zoo"]

# fixture -> the markers of a test that uses it (directly or through another fixture)
FIXTURE_MARKS: dict[str, tuple[str, ...]] = {
    "ray_cluster": ("ray",),
    "ray_driver": ("ray",),
    "ray_serve": ("ray", "serve"),  # Serve on the session's Ray, or on a private one
    "s3_server": ("s3",),
    "seaweedfs_factory": ("s3",),
    "mergekit": ("mergekit",),
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, so `-m ray` sees these markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for fixture, marks in FIXTURE_MARKS.items():
            if fixture in used:
                for name in marks:
                    if item.get_closest_marker(name) is None:
                        item.add_marker(name)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module: its tensors are tiny, and more threads only
    spin-wait on a busy shared CPU (and the golden hashes were recorded with one, as the Ray
    workers use). Applied with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

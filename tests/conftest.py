"""Shared fixtures: tiny models on disk, a SeaweedFS S3 server, one local Ray per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray listens on 127.0.0.1 only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.s3", "tests.fixtures.ray", "tests.fixtures.mergekit"]

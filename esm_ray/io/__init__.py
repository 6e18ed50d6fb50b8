"""IO layer: URIs, a lazy safetensors reader, a sharded atomic writer, local or s3://."""

from esm_ray.io.format import TensorMeta
from esm_ray.io.reader import ModelReader, check_finite, open_model
from esm_ray.io.s3 import make_client
from esm_ray.io.uri import Uri, is_s3, parse_uri
from esm_ray.io.writer import (INDEX_NAME, ShardedWriter, ShardInfo, WriteStats, check_writable,
                               is_committed, save_safetensors_atomic, shard_name)

__all__ = [
    "INDEX_NAME", "ModelReader", "ShardInfo", "ShardedWriter", "TensorMeta", "Uri", "WriteStats",
    "check_finite", "check_writable", "is_committed", "is_s3", "make_client", "open_model", "parse_uri",
    "save_safetensors_atomic", "shard_name",
]

"""Moved to :mod:`mechir.store`; re-exported here so existing imports keep working."""

from mechir.store import (
    CorruptStoreError,
    ResultsStore,
    StoreLockedError,
    decode_array,
    encode_array,
    merge_shards,
    shard_path,
    shard_paths,
)

__all__ = [
    "CorruptStoreError",
    "ResultsStore",
    "StoreLockedError",
    "decode_array",
    "encode_array",
    "merge_shards",
    "shard_path",
    "shard_paths",
]

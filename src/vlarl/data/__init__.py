"""On-disk data: the replay format shared by demonstrations, rollouts and recorded bags."""

from vlarl.data.errors import ReplayError, ReplayExistsError
from vlarl.data.replay import (
    FORMAT,
    Replay,
    ReplayWriter,
    ShardInfo,
    Transitions,
    list_shards,
    load_replay,
    read_shard,
    write_shard,
)

__all__ = [
    "FORMAT",
    "Replay",
    "ReplayError",
    "ReplayExistsError",
    "ReplayWriter",
    "ShardInfo",
    "Transitions",
    "list_shards",
    "load_replay",
    "read_shard",
    "write_shard",
]

"""DDP-safe, resumable streaming loader over a WebDataset shard set, built from generator stages.

`plan` deals shards to ranks and workers and fixes every worker's batch quota; `stages` are the
webdataset-style generators each worker runs (read -> sample refs -> shuffle -> decode -> batch);
`stream.ShardStream` runs them in-process or in DataLoader workers and resumes exactly.
"""

from train.loader.stages import CorruptShardError, ShardIntegrityError
from train.loader.stream import ShardStream, loader_workers

__all__ = ["CorruptShardError", "ShardIntegrityError", "ShardStream", "loader_workers"]

"""One module per stage, each exposing run_shard(ctx, shard) -> ShardStats (see pipeline/stage.py)."""

"""The CapRL dense-caption dataset pipeline: shards, storage, engines, reward and the CLI."""

__version__ = "0.1.0"

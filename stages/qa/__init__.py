"""Stage `qa`: MCQ generation and the visual-dependency gate -> ROOT/qa/<shard>.parquet. See stage.py."""

from stages.qa.stage import STAGE

__all__ = ["STAGE"]

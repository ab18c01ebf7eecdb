"""Stage `download`: URL lists -> image WebDataset shards (img2dataset). See stage.py."""

from stages.download.stage import STAGE

__all__ = ["STAGE"]

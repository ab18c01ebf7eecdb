"""Stage `annotate`: the captioner over image shards -> caption WebDataset shards + manifests. See stage.py."""

from stages.annotate.stage import STAGE

__all__ = ["STAGE"]

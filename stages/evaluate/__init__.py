"""Stage `evaluate`: Prism-style caption quality of several captioners side by side. See stage.py."""

from stages.evaluate.stage import STAGE

__all__ = ["STAGE"]

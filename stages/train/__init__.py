"""Stage `train`: RL of the captioner with the CapRL reward, or register a trained checkpoint. See stage.py."""

from stages.train.stage import STAGE

__all__ = ["STAGE"]

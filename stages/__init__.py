"""One package per stage: each declares its `STAGE` (pipeline.stage.Stage) and keeps its own helpers beside it."""

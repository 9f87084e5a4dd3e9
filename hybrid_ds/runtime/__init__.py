"""The run: plan, engines, pipeline, checkpoints, training loop."""

"""Training companion (issue #4): synthetic data, stage 1 and stage 2."""

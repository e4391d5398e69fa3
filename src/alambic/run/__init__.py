"""Runs: the pipeline of stages, run directories (lock, resume, pre-flight), rebuilding a run's models,
the compress chain, tuning and reports. Only the CLI sits above it."""

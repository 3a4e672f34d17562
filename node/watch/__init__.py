"""Watching a run: history, status page data, TensorBoard logs."""

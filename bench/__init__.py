"""Benchmarks of gpuplane: figures measured against floors taken in the same run."""

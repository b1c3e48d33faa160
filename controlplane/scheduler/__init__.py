"""Scheduler: queued jobs × free GPUs → placements, committed with their dispatch messages."""

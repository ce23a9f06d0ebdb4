"""Scheduler simulation: replay request traces through the real scheduler on simulated time."""

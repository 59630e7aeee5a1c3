"""Checkpoint save/load/resume."""

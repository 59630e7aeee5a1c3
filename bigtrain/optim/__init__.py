"""Optimizer construction (parameter groups) and learning-rate schedules."""

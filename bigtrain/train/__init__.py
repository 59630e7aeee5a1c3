"""The training loop, metrics and loggers."""

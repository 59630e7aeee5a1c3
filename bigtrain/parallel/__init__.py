"""Process groups and sharding strategies (applied from outside the model)."""

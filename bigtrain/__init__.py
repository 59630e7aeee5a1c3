"""bigtrain."""

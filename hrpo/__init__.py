"""HRPO with a learnable thinking projection: the project's own code (not the forks)."""

"""Marks this unsloth as the HRPO fork: upstream release plus our overlay and patch series.

Tests and tools check these names to be sure the fork, not a registry copy, is imported.
"""

FORK_NAME = "hrpo"
UPSTREAM_VERSION = "2026.10.9"

"""User commands. Run those that import the project from the repository root: ``python -m scripts.<name>``."""

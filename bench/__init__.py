"""The benchmarks. Run each from the repository root: ``python -m bench.<name> --help``."""

"""The error of bad input: a setting, flag or file the user gave, named with what was expected,
reported before any training starts (the command lines print it and exit 2)."""


class UsageError(ValueError):
    """Bad input, reported before any training starts."""

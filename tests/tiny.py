"""Kept for bench/learning.py, which still imports ``tiny`` from this folder: the tiny models
live in ``testing.tiny``. Remove this file once that bench imports ``testing.tiny``."""
from testing.tiny import save_tiny_chat_model  # noqa: F401

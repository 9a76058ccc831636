"""The optimizer of the HRPO trainer (six parameter groups, each with its own rate): the seed's
``patch.py``, kept where it promised it; the code is ``hrpo/optimizer.py``."""
from hrpo.optimizer import group_of, parameter_groups, patch_trainer_optimizer, thinking_group  # noqa: F401

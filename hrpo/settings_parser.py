"""A training run's settings from its command line: TRL's ``TrlParser`` over the four
dataclasses of ``hrpo.config`` (every field is a flag, ``--config recipe.yaml`` sets any of
them, and flags given after it win). Flags of earlier versions and of HRPO's scripts (``--lr``,
``--group_size``, ``--lora_rank``, ``--model_name``, ...) are aliases of TRL's names; a setting
given under two of its names with two values is an error. ``--help`` lists HRPO's own settings
first, in a group of their own, then those of TRL, transformers and PEFT."""
from __future__ import annotations

import copy
from dataclasses import fields
from types import MappingProxyType

from trl import GRPOConfig, ModelConfig, TrlParser

from .command_line import config_file, normalized_argv
from .config import FIELD_MARKS, HRPOConfig, HRPOModelConfig, Settings, TaskArguments, resume_request
from .errors import UsageError


HRPO_GROUP = "HRPO's settings"
LIBRARY_GROUP = "TRL's GRPOConfig and ModelConfig (transformers' TrainingArguments, PEFT's LoRA)"


class SettingsParser(TrlParser):
    """TrlParser over the four dataclasses; a YAML key may be a flag's alias (``lr``, ``group_size``)."""

    _library_fields: frozenset = frozenset()

    def _add_dataclass_arguments(self, dtype):
        """Which of ``dtype``'s fields TRL declares (HRPOConfig and HRPOModelConfig extend TRL's two
        dataclasses); the task's and the thinking dataclasses are all HRPO's."""
        library = next((base for base in (GRPOConfig, ModelConfig) if issubclass(dtype, base)), None)
        self._library_fields = frozenset(f.name for f in fields(library)) if library else frozenset()
        super()._add_dataclass_arguments(dtype)

    def _group(self, title: str):
        groups = {group.title: group for group in self._action_groups}
        return groups.get(title) or self.add_argument_group(title)

    def _parse_dataclass_field(self, parser, field):
        """transformers' HfArgumentParser hands a field's metadata to argparse as keywords (its
        documented extension point); HRPO's own marks (``hrpo.config.FIELD_MARKS``) are not argparse's.
        The flag goes into HRPO's group or the libraries' (the first dataclass, the task's, makes
        HRPO's group first)."""
        if FIELD_MARKS & set(field.metadata):
            field = copy.copy(field)
            field.metadata = MappingProxyType({k: v for k, v in field.metadata.items() if k not in FIELD_MARKS})
        group = self._group(LIBRARY_GROUP if field.name in self._library_fields else HRPO_GROUP)
        return TrlParser._parse_dataclass_field(group, field)

    def field_names(self) -> dict[str, str]:
        """Every flag name and alias, without dashes, to the field it sets."""
        return {option.lstrip("-"): action.dest for action in self._actions for option in action.option_strings}

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        names = self.field_names()
        return super().set_defaults_with_config(**{names.get(key, key): value for key, value in kwargs.items()})

    def check_aliases(self, argv: list[str], config: dict) -> None:
        """A setting given twice under two of its names (``--lr`` and ``--learning_rate`` on the
        command line, or ``lr`` and ``learning_rate`` in the YAML) with different values is an
        error naming both (argparse and the YAML reader would silently keep the last)."""
        names = self.field_names()
        flags = []
        for i, token in enumerate(argv):
            option, eq, value = token.partition("=")
            if option.startswith("--") and option[2:] in names:
                if not eq:
                    value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
                flags.append((option[2:], value))
        for pairs, where in ((flags, ""), ([(k, v) for k, v in config.items() if k in names], " in --config")):
            first: dict[str, tuple[str, object]] = {}
            for key, value in pairs:
                name = names[key]
                if name in first and first[name][0] != key and not _same_value(first[name][1], value):
                    raise UsageError(f"--{first[name][0]} {first[name][1]} and --{key} {value}{where} both set "
                                     f"{name}: give it once")
                first.setdefault(name, (key, value))


def _same_value(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def settings_parser(description: str | None = None, **task_defaults) -> SettingsParser:
    """The parser of a training run (``task_defaults``: a task script's defaults, e.g. --task math)."""
    import argparse

    from transformers.hybrid_thinking.config import ThinkingConfig

    parser = SettingsParser((TaskArguments, HRPOModelConfig, HRPOConfig, ThinkingConfig), description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    # read by config_file() before parsing; declared so that --help lists it (never parsed into a dataclass)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="RECIPE.yaml",
                        help="a YAML file of settings (any flag's name as a key); flags given on the command line win")
    parser.set_defaults(**task_defaults)
    return parser


def given_fields(parser: SettingsParser, argv: list[str]) -> set[str]:
    """The fields set on the command line (a flag, an alias or an unambiguous prefix of one, as
    argparse takes them) or in the ``--config`` file."""
    config, argv = config_file(argv)
    names = parser.field_names()
    given = {names.get(key, key) for key in config}
    for token in argv:
        option = token.partition("=")[0][2:] if token.startswith("--") else None
        if option in names:
            given.add(names[option])
        elif option:
            prefixed = {dest for name, dest in names.items() if name.startswith(option)}
            given |= prefixed if len(prefixed) == 1 else set()
    return given


def parse_settings(argv: list[str] | None = None, parser: SettingsParser | None = None) -> Settings:
    """The run's settings from the command line (and ``--config``), each dataclass checked; a
    bad value is a UsageError naming the flag."""
    import sys

    from .tasks import get_task

    argv = normalized_argv(list(sys.argv[1:] if argv is None else argv))
    parser = parser or settings_parser()
    config, flags = config_file(argv)
    parser.check_aliases(flags, config)
    try:
        task, model, training, thinking = parser.parse_args_and_config(argv)
        given = given_fields(parser, argv)
    except UsageError:
        raise
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from None
    task.dataset_path = task.dataset_path or get_task(task.task).default_dataset
    try:
        thinking = thinking.with_answer_marker(get_task(task.task).answer_marker)
    except ValueError as err:
        raise UsageError(f"the thinking options: {err}") from None
    return Settings(task, model, training, thinking, frozenset(given))


def raw_values(parser: SettingsParser, argv: list[str]):
    """The values the command line and ``--config`` give, as an argparse namespace, before any
    dataclass is made (nothing checked yet: what --resume needs to find its checkpoint)."""
    config, argv = config_file(normalized_argv(list(argv)))
    parser.set_defaults_with_config(**{k: v for k, v in config.items() if k != "env"})
    values = parser.parse_known_args(argv)[0]
    values.resume = resume_request(values.resume, values.resume_from_checkpoint)
    return values

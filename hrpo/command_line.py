"""The command lines' first reading of argv, before anything heavy is imported: earlier versions'
flag values, the ``--config`` file (its one reader) and the backend sniff (unsloth must be
imported before transformers, TRL and PEFT when it is the backend). The settings themselves
are parsed by ``hrpo.settings_parser``."""
from __future__ import annotations

from .errors import UsageError

# Flags whose value may be left out: the value they then take.
BARE_FLAG_VALUES = {"--resume": "latest"}
# Values of earlier versions' flags, as the dataclass field takes them now.
LEGACY_VALUES = {"--gradient_checkpointing": {"on": "true", "off": "false", "auto": None}}


def normalized_argv(argv: list[str]) -> list[str]:
    """argv with a bare ``--resume`` given its value, and earlier versions' values translated."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token in LEGACY_VALUES and i + 1 < len(argv) and argv[i + 1] in LEGACY_VALUES[token]:
            continue  # handled with its value
        if i and argv[i - 1] in LEGACY_VALUES and token in LEGACY_VALUES[argv[i - 1]]:
            value = LEGACY_VALUES[argv[i - 1]][token]
            if value is not None:
                out += [argv[i - 1], value]
            continue
        out.append(token)
        next_token = argv[i + 1] if i + 1 < len(argv) else None
        if token in BARE_FLAG_VALUES and (next_token is None or next_token.startswith("--")):
            out.append(BARE_FLAG_VALUES[token])
    return out


def config_file(argv: list[str]) -> tuple[dict, list[str]]:
    """The ``--config`` YAML file's settings ({} without one) and argv without the option: the
    one reader of the file. A file that cannot be read, or whose top level is not a mapping of
    settings, is a UsageError."""
    import yaml

    if "--config" not in argv:
        return {}, list(argv)
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise UsageError("--config: expected a YAML file after it")
    path = argv[i + 1]
    try:
        with open(path) as file:
            values = yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"--config {path}: cannot read it ({err})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: its top level is a {type(values).__name__}; expected a mapping of "
                         f"settings (key: value lines, e.g. `learning_rate: 5.0e-6`)")
    return values, argv[:i] + argv[i + 2:]


def requested_backend(argv: list[str]) -> str:
    """--backend as given on the command line or in the --config file, read before anything parses it
    (an unreadable --config is reported by the parser: "auto" here)."""
    for i, token in enumerate(argv):
        if token == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--backend="):
            return token.split("=", 1)[1]
    try:
        config, _ = config_file(argv)
    except UsageError:
        return "auto"
    return str(config.get("backend", "auto"))

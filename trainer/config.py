"""Config machinery shared by every command: typed choices, loading YAML with command-line overrides (draccus),
renamed options, and validation that lists every problem at once.

    python -m trainer train --config configs/tiny_toy_cpu.yaml --algo.epsilon_high 0.3 --train.iterations 50

This module defines no config section itself. Each section is one dataclass, defined by the module that uses it and
documented field by field there: `ModelConfig`, `QuantConfig`, `EnvConfig` (build.py), `OptimConfig` (engine.py),
`DistConfig` (dist.py), `LogConfig` (logging.py), `LoraSettings` (models/lora.py), `PhaseSchedule` (algos/phases.py);
the recipe (train.py) owns the rest and composes them all into `RunConfig`. A section may define `problems()`,
returning what is wrong with its values ("lr = -1; expected > 0"); `load` prefixes each with the section's path.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import enum
import tempfile
import types
import typing
import warnings
from pathlib import Path

import draccus
import yaml

# --- choices -------------------------------------------------------------------------------------------------------


class Choice(str, enum.Enum):
    """A config option with a fixed set of values, written as plain strings in YAML and on the command line.

    A str subclass, so a member compares equal to its value (`AlgoName.PPO == "ppo"`) and passes unchanged to
    functions that take the string."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> list[str]:
        return [member.value for member in cls]


class InvalidChoice(str):
    """A value that is not one of its Choice's options, kept as read until validation names it with the options."""


@draccus.decode.register(Choice, include_subclasses=True)
def _decode_choice(cls, raw_value, path=()):
    try:
        return cls(raw_value)
    except ValueError:
        return InvalidChoice(raw_value)


@draccus.encode.register(Choice, include_subclasses=True)
def _encode_choice(value, declared_type=None):
    return value.value


# --- errors ----------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A run config that cannot be used; the message lists every problem found, each with what was expected."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """`--config FILE` names a file that does not exist."""


class RenamedOptionWarning(FutureWarning):
    """An option was written under a name it no longer has; it was read under its new name."""


def check(problems: list[str], ok: bool, name: str, value, expected: str) -> None:
    """Append "name = value; expected ..." unless ok (written so that NaN fails every comparison)."""
    if not ok:
        problems.append(f"{name} = {value!r}; expected {expected}")


# --- renamed options -----------------------------------------------------------------------------------------------

# Old dotted name -> new dotted name. Run directories written before the rename keep loading (config.yaml of
# `eval --run_dir`, `export --run-dir` and resume); a warning names each renamed option and its new name.
RENAMED = {
    "algo.advantage": "algo.grpo.advantage",
    "algo.scale_rewards": "algo.grpo.scale_rewards",
    "algo.dynamic_sampling": "algo.grpo.dynamic_sampling",
    "algo.gamma": "algo.ppo.gamma",
    "algo.lam": "algo.ppo.lam",
    "algo.value_coef": "algo.ppo.value_coef",
    "algo.value_clip": "algo.ppo.value_clip",
    "algo.bc_warmup_iterations": "algo.phases.bc_warmup_iterations",
    "algo.handover_iterations": "algo.phases.handover_iterations",
    "algo.epsilon_start": "algo.phases.handover_greedy_start",
    "train.backend": "dist.backend",
}


def _warn_renamed(renamed: list[tuple[str, str]], where: str) -> None:
    if renamed:
        listed = ", ".join(f"{old} -> {new}" for old, new in renamed)
        warnings.warn(f"{where}: renamed options read under their new names: {listed}", RenamedOptionWarning,
                      stacklevel=3)


def rename_keys(tree: dict) -> tuple[dict, list[tuple[str, str]]]:
    """A config dict (as read from YAML) with RENAMED options moved to their new places; also the renames made."""
    renamed = []
    for old, new in RENAMED.items():
        *old_parents, old_leaf = old.split(".")
        parent = tree
        for key in old_parents:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        *new_parents, new_leaf = new.split(".")
        target = tree
        for key in new_parents:
            target = target.setdefault(key, {})
        if new_leaf in target:
            raise ConfigError(f"invalid config: both {old} and its new name {new} are set; keep {new} only")
        target[new_leaf] = parent.pop(old_leaf)
        renamed.append((old, new))
    return tree, renamed


def rename_args(args: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Command-line overrides with RENAMED options (`--old.name value` or `--old.name=value`) under their new names."""
    out, renamed = [], []
    for arg in args:
        name, sep, value = arg.partition("=")
        old = name[2:] if name.startswith("--") else None
        if old in RENAMED:
            arg = f"--{RENAMED[old]}{sep}{value}"
            renamed.append((old, RENAMED[old]))
        out.append(arg)
    return out, renamed


# --- loading ---------------------------------------------------------------------------------------------------------


def _split_config_path(args: list[str]) -> tuple[str | None, list[str]]:
    path, rest, index = None, [], 0
    while index < len(args):
        arg = args[index]
        if arg in ("--config", "--config_path"):
            if index + 1 >= len(args):
                raise ConfigError("invalid config: --config needs a file")
            path, index = args[index + 1], index + 2
            continue
        if arg.startswith(("--config=", "--config_path=")):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        index += 1
    return path, rest


def load(config_class, args: list[str], defaults: dict | None = None):
    """`--config FILE` (YAML) then `--section.key value` overrides, into `config_class`; validated (see
    `config_problems`). `defaults`: a config tree (as in YAML) used instead of a file when no --config is given.

    Options under an old name (RENAMED) are read under their new one with a RenamedOptionWarning."""
    path, overrides = _split_config_path(list(args))
    if path is not None and not Path(path).is_file():
        raise ConfigFileNotFoundError(f"config file {path} does not exist")
    overrides, renamed_args = rename_args(overrides)
    _warn_renamed(renamed_args, "command line")
    with tempfile.TemporaryDirectory() as scratch:
        tree = (yaml.safe_load(Path(path).read_text()) or {}) if path is not None else copy.deepcopy(defaults)
        if tree is not None:
            tree, renamed_keys = rename_keys(tree)
            _warn_renamed(renamed_keys, path or "defaults")
            if renamed_keys or path is None:  # draccus reads a file: the same options under their new names
                path = str(Path(scratch) / (Path(path).name if path else "defaults.yaml"))
                Path(path).write_text(yaml.safe_dump(tree))
        try:
            config = draccus.parse(config_class=config_class, config_path=path, args=overrides, exit_on_error=False)
        except draccus.utils.DecodingError as error:  # an option of no section, or a value of the wrong type
            raise ConfigError(f"invalid config: {error}") from error
        except draccus.ParsingError as error:  # a section that validates itself on construction refused its values
            section = _section_named(config_class, str(error))
            raise ConfigError(f"invalid config:\n  - {section}{error.__cause__ or error}") from error
        except draccus.utils.DraccusException as error:  # unknown option, a value of the wrong type, a YAML typo
            raise ConfigError(f"invalid config: {error}") from error
        except argparse.ArgumentError as error:  # e.g. "--optim.lr -1e-4": argparse reads -1e-4 as an option
            raise ConfigError(f"invalid config: {error} (for a value that starts with '-', write --key=value)") \
                from error
    found = config_problems(config)
    if found:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(found))
    return config


def dump(config) -> str:
    return draccus.dump(config)


# --- validation ------------------------------------------------------------------------------------------------------


def _choice_class(annotation):
    """The Choice subclass in a field's annotation (`X` or `X | None`), and whether None is allowed."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    choice = next((t for t in options if isinstance(t, type) and issubclass(t, Choice)), None)
    return choice, type(None) in options


def config_problems(config, prefix: str = "") -> list[str]:
    """Every problem of a config and its sections: values outside their Choice, then each section's `problems()`
    (prefixed with the section's dotted path), sections before their parent's own checks."""
    found: list[str] = []
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, InvalidChoice):
            choice, optional = _choice_class(hints[field.name])
            allowed = ([None] if optional else []) + choice.values()
            found.append(f"{prefix}{field.name} = {str(value)!r}; expected one of {allowed}")
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            found += config_problems(value, f"{prefix}{field.name}.")
    own = getattr(config, "problems", None)
    if own is not None:
        found += [f"{prefix}{problem}" for problem in own()]
    return found


def _section_named(config_class, message: str) -> str:
    """ "algo.phases: " for the section whose class name appears in a draccus error message, else ""."""
    def walk(cls, prefix):
        for field in dataclasses.fields(cls):
            annotation = typing.get_type_hints(cls)[field.name]
            if dataclasses.is_dataclass(annotation):
                if annotation.__name__ in message:
                    return f"{prefix}{field.name}: "
                found = walk(annotation, f"{prefix}{field.name}.")
                if found:
                    return found
        return ""

    return walk(config_class, "")


__all__ = [
    "RENAMED",
    "Choice",
    "ConfigError",
    "ConfigFileNotFoundError",
    "InvalidChoice",
    "RenamedOptionWarning",
    "check",
    "config_problems",
    "dump",
    "load",
    "rename_args",
    "rename_keys",
]

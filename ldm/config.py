"""The reader of every script's settings: dataclasses whose defaults come from a YAML file and whose
values any `--flag value` overrides. Flag names follow diffusers' example scripts. The dataclasses
live beside what they configure (ldm/data/config.py, ldm/training/*_config.py,
ldm/generation/config.py); what they share is here.

Everything is checked before any model, data or process is touched: unknown keys, wrong types and
invalid values fail with a message that names the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Callable
from typing import Literal

import yaml
from transformers import HfArgumentParser


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or out of range."""


def require(ok: bool, key: str, value, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid; expected {valid}")


def require_divisible(resolution: int, factor: int, what: str) -> None:
    """Images must tile exactly into latents: a VAE with factor f needs sizes divisible by f."""
    if resolution % factor:
        raise ConfigError(f"resolution {resolution} is not divisible by the {what} factor {factor}; "
                          f"use a multiple of {factor} such as {max(factor, resolution // factor * factor)}")


ConfigT = typing.TypeVar("ConfigT")


def parse_config(config_class: type[ConfigT], argv: list[str] | None = None) -> ConfigT:
    """`--config file.yaml` sets the defaults; any `--flag value` after it overrides them."""
    parser = HfArgumentParser(config_class)
    parser.add_argument("--config", default=None, help="YAML file of defaults (flags override it)")
    config_path = parser.parse_known_args(argv)[0].config
    if config_path:
        parser.set_defaults(**read_yaml(config_path, config_class))
    config, _namespace, unknown = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True, look_for_args_file=False)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    config.validate()
    return config


def read_yaml(path: str, config_class: type) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of key: value, not {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(config_class)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown key {key!r} in {path}{hint}")
    check_types(values, typing.get_type_hints(config_class), path)
    return values


def check_types(values: dict, hints: dict, path: str) -> None:
    """YAML values bypass argparse's conversion, so check each against its annotation."""
    for key, value in values.items():
        if not matches(value, hints[key]):
            raise ConfigError(f"{key} = {value!r} in {path} has the wrong type; expected {describe(hints[key])}")


def matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(matches(item, args[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is float:  # YAML reads 1e-4 (no dot) as a string; argparse converts it like a flag value
        return isinstance(value, (int, float)) and not isinstance(value, bool) or is_float_text(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def is_float_text(value) -> bool:
    try:
        return isinstance(value, str) and float(value) == float(value)
    except ValueError:
        return False


def describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0])}"
    return "null" if hint is type(None) else hint.__name__


def run_script(main: Callable[[], object]) -> None:
    """Run a script's `main`; a ConfigError ends it as argparse's own errors do, with the message and
    exit code 2, not a traceback."""
    try:
        main()
    except ConfigError as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        sys.exit(2)


RUN_CONFIG = "training_config.yaml"  # the resolved settings, beside every output


def save_config(config, path: str) -> None:
    """The resolved settings, as YAML that `--config` reads back."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)


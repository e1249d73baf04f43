"""ConfigError, and the two checks every node of the config tree validates with."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value, override or combination that cannot run; the message names it."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_choice(node: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    check(value in choices, f"{node}.{name}={value!r} is not one of {choices}")

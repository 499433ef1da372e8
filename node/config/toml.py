"""Reading TOML tables strictly: every key known, every value of the right type.

Used by :mod:`node.config.schema` and :mod:`node.inference.manifest` so that a wrong key or value stops the
node at start with a message that names it (``routes[0].priority: ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from node.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def load_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error becomes a :class:`ConfigError` naming the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


class Table:
    """A TOML table being read: values are taken one by one, leftovers are errors."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
        self._data = dict(data)
        self.where = where

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        """Take ``key``; it must be an instance of ``kind`` (ints accepted for floats)."""
        if key not in self._data:
            return default
        value = self._data.pop(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and kind is not bool and (
            kind is int or kind is float or (isinstance(kind, tuple) and bool not in kind)
        ):
            raise ConfigError(f"{self._name(key)}: expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(
                f"{self._name(key)}: expected {_kind_name(kind)}, got {type(value).__name__} {value!r}"
            )
        return value

    def has(self, key: str) -> bool:
        """Whether ``key`` is given (and not yet taken)."""
        return key in self._data

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self._data:
            raise ConfigError(f"{self._name(key)}: required key is missing")
        return self.get(key, kind, None)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise ConfigError(f"{self._name(key)}: must be one of {', '.join(choices)}; got {value!r}")
        return value

    def str_list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, list, list(default))
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self._name(key)}[{i}]: expected a string, got {item!r}")
        return tuple(value)

    def num_list(self, key: str, length: int | None, default: tuple[float, ...] = ()) -> tuple[float, ...]:
        value = self.get(key, list, list(default))
        if length is not None and value and len(value) != length:
            raise ConfigError(f"{self._name(key)}: expected {length} numbers, got {len(value)}")
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise ConfigError(f"{self._name(key)}[{i}]: expected a number, got {item!r}")
        return tuple(float(v) for v in value)

    def positive(self, key: str, kind: type, default: Any) -> Any:
        value = self.get(key, kind, default)
        if value is not None and value <= 0:
            raise ConfigError(f"{self._name(key)}: must be positive; got {value!r}")
        return value

    def table(self, key: str) -> "Table":
        return Table(self.get(key, dict, {}), self._name(key))

    def tables(self, key: str) -> list["Table"]:
        value = self.get(key, list, [])
        return [Table(item, f"{self._name(key)}[{i}]") for i, item in enumerate(value)]

    def parse(self, key: str, default: T, parser: Callable[[Any, str], T]) -> T:
        if key not in self._data:
            return default
        return parser(self._data.pop(key), self._name(key))

    def done(self) -> None:
        """Raise if keys are left that nobody asked for (a typo, usually)."""
        if self._data:
            names = ", ".join(self._name(k) for k in sorted(self._data))
            raise ConfigError(f"unknown key(s): {names}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)

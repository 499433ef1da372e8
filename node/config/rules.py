"""Routing rules: a small language of data (never code) over DICOM headers and association facts.

A *rule* is a TOML table of ``key = condition``; every key must hold. Keys are DICOM keywords,
tags written ``"(0018,0015)"`` or ``"00180015"``, or the association facts ``CallingAETitle``,
``CalledAETitle`` and ``CallerAddress`` (the sender's IP address). A rule table may also hold
``all = [rules]``, ``any = [rules]`` and ``none = [rules]`` to combine nested rules.

A condition is one of::

    "CT"                  a pattern: * and ? wildcards, case-insensitive
    ["CT", "PT"]          any of several patterns (or numbers)
    5  /  2.5             a number: numeric equality
    { eq = "CT*" }        the same as a bare value, for use beside other operators
    { regex = "^CHEST" }  a regular expression (Python syntax, searched, case-sensitive)
    { range = [1, 5] }    a number between both bounds, inclusive
    { gt = 5, le = 10 }   comparisons: gt, ge, lt, le
    { present = true }    the attribute has a non-empty value (false: it has none)
    { network = "10.0.0.0/8" }   an IP address inside a network (or a list of them)
    { not = condition }   the condition does not hold (an absent attribute satisfies it)

Several operators in one table must all hold. Values are compared as pydicom decodes them
(``SpecificCharacterSet`` honoured), without DICOM's space padding; an empty value counts as
absent. A multi-valued attribute satisfies a condition when any one of its values does (so
``not`` means: none of its values does). An attribute missing at the top level of the
header is looked up inside sequences (the occurrence nearest the top level, then the first).
File meta attributes (``TransferSyntaxUID``) can be matched too.

Rules are compiled once, when the configuration is loaded, into frozen objects; a bad key,
operator, number or regular expression raises :class:`ConfigError` naming its path.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from pydicom.dataelem import DataElement
from pydicom.datadict import keyword_dict, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from node.errors import ConfigError

#: Keys that are facts of the association rather than DICOM attributes.
ASSOCIATION_FACTS = ("CallingAETitle", "CalledAETitle", "CallerAddress")
COMBINATIONS = ("all", "any", "none")
OPERATORS = ("eq", "regex", "range", "gt", "ge", "lt", "le", "present", "network", "not")
_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")
_SHOWN_CHARS = 64
_SEQUENCE_VALUE = "<sequence>"
_FILE_META_GROUP = 0x0002     # TransferSyntaxUID and friends live in the file meta information
_DECODE_ERRORS = (ValueError, TypeError, UnicodeError, LookupError, OverflowError, AttributeError)


# --------------------------------------------------------------------------- facts
class Facts:
    """What a rule looks at: one header (without pixels) plus the association's facts.

    ``header`` is a pydicom :class:`Dataset` or a mapping of DICOM keyword to value (tests,
    tools); ``association`` maps the names in :data:`ASSOCIATION_FACTS` to their values.
    """

    def __init__(self, header: Dataset | Mapping[str, Any] | None = None,
                 association: Mapping[str, str] | None = None) -> None:
        self._association = {k: v for k, v in (association or {}).items() if v}
        self._dataset: Dataset | None = None
        self._plain: dict[int, Any] = {}
        self._nested: dict[int, DataElement] | None = None
        if isinstance(header, Dataset):
            self._dataset = header
        elif header is not None:
            for name, value in header.items():
                if name in ASSOCIATION_FACTS:
                    if value:
                        self._association.setdefault(name, str(value))
                elif name in keyword_dict:
                    self._plain[keyword_dict[name]] = value

    def values(self, key: "Key") -> tuple[str, ...]:
        """The non-empty string values of ``key``; an empty tuple when absent or empty."""
        if key.tag is None:
            return _strings(self._association.get(key.name))
        if self._dataset is None:
            return _strings(self._plain.get(key.tag))
        try:
            meta = getattr(self._dataset, "file_meta", None)
            source = meta if key.tag >> 16 == _FILE_META_GROUP and meta is not None else self._dataset
            elem = source.get(key.tag)
            if elem is None:
                elem = self._nested_elements().get(key.tag)
            return () if elem is None else _strings(elem.value)
        except _DECODE_ERRORS as exc:
            raise UnreadableValue(f"{key.name} cannot be decoded ({exc})") from None

    def _nested_elements(self) -> dict[int, DataElement]:
        """Each tag's occurrence inside sequences nearest the top level (then the first), built once."""
        if self._nested is None:
            found: dict[int, DataElement] = {}
            stack = [self._dataset]
            while stack:
                ds = stack.pop(0)
                for tag in list(ds.keys()):
                    try:
                        elem = ds[tag]
                    except _DECODE_ERRORS:
                        continue       # a malformed nested value is skipped, not fatal
                    if elem.VR == "SQ" and isinstance(elem.value, DicomSequence):
                        stack.extend(elem.value)
                    elif ds is not self._dataset:
                        found.setdefault(int(elem.tag), elem)
            self._nested = found
        return self._nested


class UnreadableValue(Exception):
    """A header value cannot be decoded; the rule testing it does not hold."""


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, DicomSequence):
        return (_SEQUENCE_VALUE,) if len(value) else ()
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).rstrip(b"\x00 ").decode("latin-1")
    items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    out = []
    for item in items:
        text = str(item).strip(" \x00")
        if text:
            out.append(text)
    return tuple(out)


# ----------------------------------------------------------------------- conditions
@dataclass(frozen=True)
class Key:
    """A rule key: ``name`` as written; ``tag`` None for an association fact."""

    name: str
    tag: int | None


@dataclass(frozen=True)
class Patterns:
    """Wildcard patterns (case-insensitive) and numbers (numeric equality); any may match."""

    items: tuple[str | float, ...]
    _compiled: tuple[re.Pattern[str] | float, ...] = field(compare=False, repr=False)

    @classmethod
    def of(cls, items: tuple[str | float, ...]) -> "Patterns":
        compiled = tuple(item if isinstance(item, float)
                         else re.compile(fnmatch.translate(item), re.IGNORECASE | re.DOTALL)
                         for item in items)
        return cls(items, compiled)

    def holds(self, values: tuple[str, ...]) -> bool:
        for pattern in self._compiled:
            for value in values:
                if isinstance(pattern, float):
                    number = _number(value)
                    if number is not None and number == pattern:
                        return True
                elif pattern.match(value):
                    return True
        return False

    def describe(self) -> str:
        shown = [_show(i) for i in self.items]
        return f"is {shown[0]}" if len(shown) == 1 else f"is one of [{', '.join(shown)}]"

    def failure(self, values: tuple[str, ...]) -> str:
        return f"matches none of [{', '.join(_show(i) for i in self.items)}]"


@dataclass(frozen=True)
class Regex:
    pattern: re.Pattern[str]

    def holds(self, values: tuple[str, ...]) -> bool:
        return any(self.pattern.search(v) for v in values)

    def describe(self) -> str:
        return f"matches regex {self.pattern.pattern!r}"

    def failure(self, values: tuple[str, ...]) -> str:
        return f"does not match regex {self.pattern.pattern!r}"


@dataclass(frozen=True)
class Bounds:
    """A numeric interval; ``None`` is unbounded on that side."""

    low: float | None = None
    low_inclusive: bool = True
    high: float | None = None
    high_inclusive: bool = True

    def holds(self, values: tuple[str, ...]) -> bool:
        return any(self.contains(n) for n in (_number(v) for v in values) if n is not None)

    def contains(self, n: float) -> bool:
        if self.low is not None and (n < self.low or (n == self.low and not self.low_inclusive)):
            return False
        if self.high is not None and (n > self.high or (n == self.high and not self.high_inclusive)):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>=' if self.low_inclusive else '>'} {_show(self.low)}")
        if self.high is not None:
            parts.append(f"{'<=' if self.high_inclusive else '<'} {_show(self.high)}")
        return "is " + " and ".join(parts)

    def failure(self, values: tuple[str, ...]) -> str:
        if all(_number(v) is None for v in values):
            return "is not a number"
        return f"is not {self.describe()[3:]}"


@dataclass(frozen=True)
class Networks:
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def holds(self, values: tuple[str, ...]) -> bool:
        for value in values:
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                continue
            if any(address in net for net in self.networks):
                return True
        return False

    def describe(self) -> str:
        return f"is in {', '.join(map(str, self.networks))}"

    def failure(self, values: tuple[str, ...]) -> str:
        return f"is not in {', '.join(map(str, self.networks))}"


@dataclass(frozen=True)
class Present:
    wanted: bool

    def holds(self, values: tuple[str, ...]) -> bool:
        return bool(values) == self.wanted

    def describe(self) -> str:
        return "is present" if self.wanted else "is absent"

    def failure(self, values: tuple[str, ...]) -> str:
        return "is present" if not self.wanted else "is absent"


@dataclass(frozen=True)
class Not:
    inner: "Condition"

    def holds(self, values: tuple[str, ...]) -> bool:
        return not self.inner.holds(values)

    def describe(self) -> str:
        return f"not ({self.inner.describe()})"

    def failure(self, values: tuple[str, ...]) -> str:
        return f"{self.inner.describe()} (excluded by not)"


@dataclass(frozen=True)
class Both:
    """Several operators of one table: all must hold."""

    parts: tuple["Condition", ...]

    def holds(self, values: tuple[str, ...]) -> bool:
        return all(p.holds(values) for p in self.parts)

    def describe(self) -> str:
        return " and ".join(p.describe() for p in self.parts)

    def failure(self, values: tuple[str, ...]) -> str:
        return next(p.failure(values) for p in self.parts if not p.holds(values))


Condition = Union[Patterns, Regex, Bounds, Networks, Present, Not, Both]


# ------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Verdict:
    """Whether a rule holds, and why (or why not) in one line."""

    holds: bool
    reason: str


@dataclass(frozen=True)
class Test:
    """One key and its condition."""

    key: Key
    condition: Condition

    def evaluate(self, facts: Facts) -> Verdict:
        try:
            values = facts.values(self.key)
        except UnreadableValue as exc:
            return Verdict(False, str(exc))
        if self.condition.holds(values):
            return Verdict(True, self.describe())
        if not values:
            return Verdict(False, f"{self.key.name} is absent")
        shown = "\\".join(values)
        shown = shown if len(shown) <= _SHOWN_CHARS else shown[:_SHOWN_CHARS] + "..."
        return Verdict(False, f"{self.key.name}='{shown}' {self.condition.failure(values)}")

    def describe(self) -> str:
        return f"{self.key.name} {self.condition.describe()}"


@dataclass(frozen=True)
class Group:
    """``all``, ``any`` or ``none`` of its members; an empty ``all`` always holds."""

    mode: str
    members: tuple["Rule", ...]

    def evaluate(self, facts: Facts) -> Verdict:
        verdicts = [m.evaluate(facts) for m in self.members]
        if self.mode == "all":
            failed = next((v for v in verdicts if not v.holds), None)
            if failed is not None:
                return failed
            return Verdict(True, "; ".join(v.reason for v in verdicts) or "no conditions")
        if self.mode == "any":
            hit = next((v for v in verdicts if v.holds), None)
            if hit is not None:
                return Verdict(True, hit.reason)
            return Verdict(False, "none of the alternatives holds: "
                           + " | ".join(v.reason for v in verdicts))
        hit = next((v for v in verdicts if v.holds), None)      # none
        if hit is not None:
            return Verdict(False, f"excluded because {hit.reason}")
        return Verdict(True, "none of the exclusions holds")

    def describe(self) -> str:
        if self.mode == "all":
            return "; ".join(m.describe() for m in self.members) or "no conditions"
        return f"{self.mode} of ({' | '.join(m.describe() for m in self.members)})"


Rule = Union[Test, Group]
MATCH_ALL = Group("all", ())


# ----------------------------------------------------------------------- compiling
def compile_rule(table: Any, where: str) -> Group:
    """Compile a rule table (``{ Modality = "CT", any = [...] }``).

    Raises:
        ConfigError: naming the key path of the first bad key, operator or value.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of DICOM keyword = value(s)")
    members: list[Rule] = []
    for name, value in table.items():
        path = f"{where}.{name}"
        if name in COMBINATIONS:
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{path}: expected a non-empty list of rule tables")
            members.append(Group(name, tuple(compile_rule(v, f"{path}[{i}]") for i, v in enumerate(value))))
        else:
            members.append(Test(compile_key(name, path), compile_condition(value, path)))
    return Group("all", tuple(members))


def compile_key(name: str, where: str) -> Key:
    """A DICOM keyword, a tag, or an association fact.

    Raises:
        ConfigError: none of these.
    """
    if name in ASSOCIATION_FACTS:
        return Key(name, None)
    if name in keyword_dict:
        return Key(name, keyword_dict[name])
    m = _TAG.match(name)
    if m:
        tag = int(m[1] + m[2], 16)
        return Key(keyword_for_tag(tag) or f"({m[1].upper()},{m[2].upper()})", tag)
    raise ConfigError(f"{where}: not a DICOM keyword, a tag like \"(0018,0015)\", nor one of "
                      f"{', '.join(ASSOCIATION_FACTS)}")


def compile_condition(value: Any, where: str) -> Condition:
    """A bare value, a list of values, or a table of operators.

    Raises:
        ConfigError: naming ``where`` and what is wrong.
    """
    if isinstance(value, dict):
        return _operators(value, where)
    return Patterns.of(_pattern_items(value, where))


def _pattern_items(value: Any, where: str) -> tuple[str | float, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(f"{where}: expected a value or a non-empty list of values")
    out: list[str | float] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            hint = " (use { present = true })" if isinstance(item, bool) else ""
            raise ConfigError(f"{where}: expected a string or a number, got {item!r}{hint}")
        out.append(float(item) if isinstance(item, (int, float)) else item)
    return tuple(out)


def _operators(table: dict[str, Any], where: str) -> Condition:
    if not table:
        raise ConfigError(f"{where}: empty operator table (operators: {', '.join(OPERATORS)})")
    parts: list[Condition] = []
    low: tuple[float, bool] | None = None
    high: tuple[float, bool] | None = None
    for op, arg in table.items():
        path = f"{where}.{op}"
        if op == "eq":
            parts.append(Patterns.of(_pattern_items(arg, path)))
        elif op == "regex":
            parts.append(Regex(_regex(arg, path)))
        elif op == "range":
            if (not isinstance(arg, list) or len(arg) != 2
                    or not all(_is_number(a) for a in arg) or arg[0] > arg[1]):
                raise ConfigError(f"{path}: expected [low, high], two numbers with low <= high")
            parts.append(Bounds(float(arg[0]), True, float(arg[1]), True))
        elif op in ("gt", "ge", "lt", "le"):
            if not _is_number(arg):
                raise ConfigError(f"{path}: expected a number, got {arg!r}")
            if op in ("gt", "ge"):
                low = (float(arg), op == "ge")
            else:
                high = (float(arg), op == "le")
        elif op == "present":
            if not isinstance(arg, bool):
                raise ConfigError(f"{path}: expected true or false")
            parts.append(Present(arg))
        elif op == "network":
            parts.append(Networks(_networks(arg, path)))
        elif op == "not":
            parts.append(Not(compile_condition(arg, path)))
        else:
            raise ConfigError(f"{path}: unknown operator (operators: {', '.join(OPERATORS)})")
    if low is not None or high is not None:
        bounds = Bounds(low[0] if low else None, low[1] if low else True,
                        high[0] if high else None, high[1] if high else True)
        if bounds.low is not None and bounds.high is not None and bounds.low > bounds.high:
            raise ConfigError(f"{where}: the lower bound is above the upper bound")
        parts.append(bounds)
    return parts[0] if len(parts) == 1 else Both(tuple(parts))


def compile_bounds(value: Any, where: str) -> Bounds:
    """A numeric threshold: ``{ gt = 5000 }``, ``{ range = [a, b] }`` or a number (>=).

    Raises:
        ConfigError: not a numeric condition.
    """
    if _is_number(value):
        return Bounds(float(value), True)
    condition = _operators(value, where) if isinstance(value, dict) else None
    if not isinstance(condition, Bounds):
        raise ConfigError(f"{where}: expected a number or a table of gt, ge, lt, le or range")
    return condition


def _regex(arg: Any, where: str) -> re.Pattern[str]:
    if not isinstance(arg, str):
        raise ConfigError(f"{where}: expected a regular expression string")
    try:
        return re.compile(arg)
    except re.error as exc:
        raise ConfigError(f"{where}: invalid regular expression {arg!r}: {exc}") from None


def _networks(arg: Any, where: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    items = arg if isinstance(arg, list) else [arg]
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{where}: {item!r} is not an IP address or network (e.g. 10.1.0.0/16)") from None
    if not out or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{where}: expected a network string or a list of them")
    return tuple(out)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _show(item: str | float) -> str:
    if isinstance(item, float):
        return str(int(item)) if item.is_integer() else str(item)
    return repr(item)

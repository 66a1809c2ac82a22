"""Building blocks shared by every resource model: base classes, value types and the per-model error carrier.

Values are validated where they are declared (a duration field says it is a duration), so pydantic reports
every bad field of a document at once, each at its own path. Rules that span several fields live in the
models' ``model_validator`` hooks and raise :class:`FieldErrors`, with paths relative to the raising model.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, model_validator
from pydantic.alias_generators import to_camel

DURATION_MESSAGE = "must be a duration like 1.5s, 500ms or 1m"

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class FieldErrors(ValueError):
    """Raised by a model validator: ``(path, message)`` pairs relative to the model ("" = the model)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in items))


class _Model(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # protobuf JSON and Kubernetes both read `key: null` (or a bare `key:` in YAML) as "not set".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class IstioModel(_Model):
    """Istio message: camelCase keys, unknown keys rejected (a typo must not silently change routing)."""

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class KubeModel(_Model):
    """Kubernetes object subset: kizuna validates the fields it uses and ignores the rest of the API."""

    model_config = ConfigDict(frozen=True, extra="ignore", alias_generator=to_camel, populate_by_name=True)


def parse_duration(value: object) -> float:
    """Go ``time.ParseDuration`` syntax (``1.5s``, ``500ms``, ``1h30m``, ``0``) to float seconds."""
    if isinstance(value, str):
        text = value.strip()
        if text in ("0", "+0", "-0"):
            return 0.0
        if _DURATION.fullmatch(text):
            total = sum(float(num) * _UNITS[unit] for num, unit in _DURATION_PART.findall(text))
            return -total if text.startswith("-") else total
    raise ValueError(DURATION_MESSAGE)


def _at_least_1ms(seconds: float) -> float:
    # Istio's agent.ValidateDuration: >= 1ms and whole milliseconds (Envoy's granularity for these timers).
    if seconds < 0.001:
        raise ValueError("must be at least 1ms")
    if abs(seconds * 1000 - round(seconds * 1000)) > 1e-6:
        raise ValueError("must be a whole number of milliseconds")
    return seconds


def _zero_or_at_least_1ms(seconds: float) -> float:
    return seconds if seconds == 0 else _at_least_1ms(seconds)


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be between 1 and 65535")
    return value


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _percent(value: float) -> float:
    if not 0 <= value <= 100:
        raise ValueError("must be between 0 and 100")
    return value


def _int_percent(value: int) -> int:
    _percent(value)
    return value


def between(low: int, high: int) -> AfterValidator:
    """A validator for ints in ``low..high`` with the message ``must be between low and high``."""

    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return AfterValidator(check)


def _dns_label(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise ValueError(f"{value!r} must be a lowercase RFC 1123 label (a-z, 0-9 and '-', at most 63 "
                         "characters)")
    return value


def _dns_subdomain(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(f"{value!r} must be a lowercase RFC 1123 name (a-z, 0-9, '-' and '.')")
    return value


def check_regex(pattern: str) -> str:
    """Return ``pattern`` if it compiles, else raise ValueError with the reason."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
    return pattern


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Any Go duration, in seconds (may be 0)."""
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_at_least_1ms)]
"""A duration Istio requires to be >= 1ms."""
OptionalTimeout = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_zero_or_at_least_1ms)]
"""A duration where 0 means "disabled", otherwise >= 1ms."""
Port = Annotated[int, AfterValidator(_port)]
NonNegative = Annotated[int, AfterValidator(_non_negative)]
Percentage = Annotated[float, AfterValidator(_percent)]
IntPercentage = Annotated[int, AfterValidator(_int_percent)]
DnsLabel = Annotated[str, AfterValidator(_dns_label)]
DnsSubdomain = Annotated[str, AfterValidator(_dns_subdomain)]
Regex = Annotated[str, AfterValidator(check_regex)]
Labels = dict[str, str]


def set_fields(model: BaseModel, *names: str) -> list[str]:
    """The camelCase names of those of ``names`` that are set (not None, not empty) on ``model``."""
    out = []
    for name in names:
        value: Any = getattr(model, name)
        if value is not None and value != "" and value != [] and value != {}:
            out.append(to_camel(name))
    return out


def at_most_one(model: BaseModel, *names: str) -> list[tuple[str, str]]:
    """An error when more than one of a proto ``oneof`` group is set."""
    chosen = set_fields(model, *names)
    if len(chosen) > 1:
        group = ", ".join(to_camel(n) for n in names)
        return [("", f"only one of {group} may be set (got {', '.join(chosen)})")]
    return []

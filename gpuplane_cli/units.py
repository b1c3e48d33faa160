"""Exact parsing and formatting of credits, durations, sizes and CPU amounts for the CLI."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

MICRO = 1_000_000
INT64_MAX = 2**63 - 1

_DECIMAL_RE = re.compile(r"^\+?(?:\d+(?:\.\d*)?|\.\d+)$")
_DURATION_PART_RE = re.compile(r"(\d+)([dhms])")
_DURATION_UNITS = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_credits(text: str, *, allow_zero: bool = False) -> int:
    """Credits as a decimal string ("2.5") to integer micro-credits (2_500_000), exactly.

    Only plain non-negative decimals with at most 6 decimal places are accepted: no
    exponents, signs, separators or fractions of a micro-credit. Never goes through float.
    """
    value = text.strip()
    if not _DECIMAL_RE.match(value):
        raise ValueError(f"{text!r} is not a decimal amount of credits (e.g. 2.5)")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a decimal amount of credits") from None
    micro = amount * MICRO
    if micro != micro.to_integral_value():
        raise ValueError(f"{text!r} has more than 6 decimal places (1 micro-credit = 0.000001)")
    result = int(micro)
    if result == 0 and not allow_zero:
        raise ValueError(f"{text!r}: the amount must be more than 0")
    if result > INT64_MAX:
        raise ValueError(f"{text!r} is too large")
    return result


def format_credits(micro: int) -> str:
    """Integer micro-credits as credits with exactly 6 decimals: 2_500_000 → "2.500000"."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{fraction:06d}"


def parse_duration(text: str) -> int:
    """A duration to whole seconds: "90" or "90s", "10m", "2h", "1d", "1h30m"."""
    value = text.strip().lower()
    if value.isdigit():
        seconds = int(value)
    else:
        parts = _DURATION_PART_RE.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ValueError(f"{text!r} is not a duration (e.g. 90, 45s, 10m, 2h, 1h30m)")
        units = [u for _, u in parts]
        if len(set(units)) != len(units):
            raise ValueError(f"{text!r} repeats a unit")
        seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r}: the duration must be more than 0 seconds")
    return seconds


def format_duration_ms(ms: int) -> str:
    """Milliseconds for humans: 950 → "950ms", 61_500 → "1m01.5s", 7_260_000 → "2h01m"."""
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    total = ms // 1000
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}.{(ms % 1000) // 100}s"


def parse_size(text: str) -> int:
    """A byte size: "512m", "4g", "4GiB", "1.5G" (binary multiples), or plain bytes."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size (e.g. 512m, 4g, 16GiB)")
    number, prefix, _ = match.groups()
    size = Decimal(number) * (1024 ** _SIZE_POWERS[prefix.lower()])
    if size != size.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(size)


def format_bytes(size: int) -> str:
    """Bytes for humans with binary units: 1536 → "1.5KiB"."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_cpus(text: str) -> int:
    """CPUs to millicores: "2" → 2000, "0.5" → 500, "250m" → 250."""
    value = text.strip().lower()
    if value.endswith("m") and value[:-1].isdigit():
        millis = int(value[:-1])
    else:
        if not _DECIMAL_RE.match(value):
            raise ValueError(f"{text!r} is not a CPU amount (e.g. 2, 0.5, 250m)")
        exact = Decimal(value) * 1000
        if exact != exact.to_integral_value():
            raise ValueError(f"{text!r} is finer than a millicore")
        millis = int(exact)
    if millis <= 0:
        raise ValueError(f"{text!r}: must be more than 0")
    return millis


def parse_key_value(text: str) -> tuple[str, str]:
    """ "K=V" → ("K", "V"); the value may contain "=" and be empty, the key may not."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{text!r} is not KEY=VALUE")
    return key, value


def format_utilization(basis_points: int) -> str:
    """Basis points (10000 = 100 %) as a percentage with one decimal: 8925 → "89.3%"."""
    tenths = (basis_points + 5) // 10
    return f"{tenths // 10}.{tenths % 10}%"


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A moment: a duration ago ("2h", "1d", as parse_duration reads them) or an RFC 3339 /
    ISO 8601 date or date-time ("2026-11-23", "2026-11-23T10:00:00Z"); naive values are UTC."""
    try:
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration ago (2h, 1d) nor a time (2026-11-23T10:00:00Z)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)

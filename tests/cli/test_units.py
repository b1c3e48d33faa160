"""Exact money, duration, size and CPU parsing and formatting of the CLI."""

from __future__ import annotations

import pytest

from gpuplane_cli.units import (
    format_bytes,
    format_credits,
    format_duration_ms,
    parse_cpus,
    parse_credits,
    parse_duration,
    parse_key_value,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("2.5", 2_500_000),
        ("1", 1_000_000),
        ("0.000001", 1),
        ("0.1", 100_000),
        ("0.3", 300_000),  # 0.1 + 0.2 style float traps do not apply: Decimal all the way
        (".5", 500_000),
        ("3.", 3_000_000),
        ("+7", 7_000_000),
        ("  12.345678 ", 12_345_678),
        ("9223372036854.775807", 2**63 - 1),
        ("1234567890.123456", 1_234_567_890_123_456),
        ("2.500000000", 2_500_000),  # trailing zeros beyond 6 places are still exact
    ],
)
def test_parse_credits_is_exact(text: str, micro: int) -> None:
    assert parse_credits(text) == micro


@pytest.mark.parametrize(
    "text",
    [
        "0.0000001",  # a tenth of a micro-credit
        "1.0000005",
        "-1",
        "1e3",
        "1,000",
        "abc",
        "",
        ".",
        "nan",
        "inf",
        "0x10",
        "9223372036854.775808",  # one past int64
    ],
)
def test_parse_credits_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_credits(text)


def test_zero_credits_only_when_allowed() -> None:
    with pytest.raises(ValueError, match="more than 0"):
        parse_credits("0")
    assert parse_credits("0.000", allow_zero=True) == 0


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (0, "0.000000"),
        (1, "0.000001"),
        (2_500_000, "2.500000"),
        (-2_500_000, "-2.500000"),
        (-1, "-0.000001"),
        (2**63 - 1, "9223372036854.775807"),
        (123_456_789_012, "123456.789012"),
    ],
)
def test_format_credits(micro: int, text: str) -> None:
    assert format_credits(micro) == text


@pytest.mark.parametrize("micro", [0, 1, 999_999, 1_000_000, 2_500_000, 10**15 + 7])
def test_credits_round_trip(micro: int) -> None:
    assert parse_credits(format_credits(micro), allow_zero=True) == micro


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("45s", 45),
        ("10m", 600),
        ("2h", 7200),
        ("1d", 86_400),
        ("1h30m", 5400),
        ("1H30M", 5400),
        ("2h0m5s", 7205),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "10x", "1.5h", "h", "-5", "10m10m", "5s10m x"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_duration(text)


def test_format_duration_ms() -> None:
    assert format_duration_ms(950) == "950ms"
    assert format_duration_ms(1500) == "1.5s"
    assert format_duration_ms(61_500) == "1m01.5s"
    assert format_duration_ms(7_260_000) == "2h01m"


def test_sizes_and_cpus() -> None:
    assert parse_size("512m") == 512 * 2**20
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("1.5g") == 3 * 2**29
    assert parse_size("100") == 100
    with pytest.raises(ValueError, match="size"):
        parse_size("4 bananas")
    assert format_bytes(1536) == "1.5KiB"
    assert format_bytes(12) == "12B"
    assert parse_cpus("2") == 2000
    assert parse_cpus("0.5") == 500
    assert parse_cpus("250m") == 250
    with pytest.raises(ValueError, match="millicore"):
        parse_cpus("0.0005")


def test_key_value() -> None:
    assert parse_key_value("A=b=c") == ("A", "b=c")
    assert parse_key_value("EMPTY=") == ("EMPTY", "")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_key_value("=x")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_key_value("novalue")

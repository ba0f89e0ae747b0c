"""Parsing of sizes, counts, CPUs and durations as typed on the command line."""

from __future__ import annotations

import pytest

from trio_jobs.cli import units


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("1G", 1 << 30),
        ("1.5G", 3 << 29),
        ("10MiB", 10 << 20),
        ("64k", 64 << 10),
        ("64KB", 64 << 10),
        ("1048576", 1048576),
        (" 2T ", 2 << 40),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert units.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1M", "0", "1.5X", "1e3", "nan", "10 MBs", "9" * 30])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"size"):
        units.parse_size(text)


@pytest.mark.parametrize(("text", "expected"), [("4096", 4096), ("10k", 10_000), ("1.5M", 1_500_000)])
def test_parse_count(text: str, expected: int) -> None:
    assert units.parse_count(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-5", "ten", "5G"])
def test_parse_count_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"count"):
        units.parse_count(text)


@pytest.mark.parametrize(("text", "expected"), [("1.5", 1500), ("2", 2000), ("500m", 500), (".25", 250)])
def test_parse_cpus(text: str, expected: int) -> None:
    assert units.parse_cpus(text) == expected


@pytest.mark.parametrize("text", ["", "0", "0.0001", "-1", "1.5 cpus", "1k"])
def test_parse_cpus_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"CPU"):
        units.parse_cpus(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5s", 5.0), ("0", 0.0), ("1.5", 1.5), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("0s", 0.0)],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert units.parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "-1s", "5d", "s", "1e9h", "5 seconds"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration"):
        units.parse_duration(text)


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0B"), (1023, "1023B"), (1536, "1.5K"), (1_048_576_000, "1000M"), (100 << 20, "100M"), (1 << 30, "1G")]
)
def test_format_size(n: int, text: str) -> None:
    assert units.format_size(n) == text


@pytest.mark.parametrize(("s", "text"), [(0.0123, "12ms"), (1.5, "1.5s"), (2.0, "2s"), (75.5, "1m16s"), (7322, "2h2m")])
def test_format_duration(s: float, text: str) -> None:
    assert units.format_duration(s) == text

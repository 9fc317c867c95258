"""Duration syntax of clients.conf (SERVER.md §4.4)."""

import datetime

import pytest

from mandos import timespec

td = datetime.timedelta


@pytest.mark.parametrize("text, expected", [
    ("PT5M", td(minutes=5)), ("PT2M", td(minutes=2)), ("PT0S", td(0)), ("PT1S", td(seconds=1)),
    ("P1W", td(weeks=1)), ("P3D", td(days=3)), ("P1DT3M20S", td(days=1, minutes=3, seconds=20)),
    ("PT1H30M", td(hours=1, minutes=30)), ("PT5M30S", td(minutes=5, seconds=30)),
    ("P1Y2M3DT4H5M6S", td(days=364 + 56 + 3, hours=4, minutes=5, seconds=6)),
    ("P1M", td(days=28)), ("P1Y", td(days=364)), ("P2M3D", td(days=59)),
])
def test_valid_rfc3339_durations(text, expected):
    assert timespec.parse_rfc3339_duration(text) == expected
    assert timespec.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["P", "PT", "P1D2W", "P2W2H", "P1Y3D", "PT1H30S", "PT1S2M",
                                  "P1H2S", "pt5m", "PT1.5S", "1D", "P-1D", "PT 5M", "P1DT",
                                  "PW", "P1W2D", "P１D"])
def test_invalid_rfc3339_durations(text):
    with pytest.raises(ValueError):
        timespec.parse_rfc3339_duration(text)


@pytest.mark.parametrize("text, expected", [
    ("5m", td(minutes=5)), ("7d", td(days=7)),
    ("1w 2d 3h 4m 5s", td(weeks=1, days=2, hours=3, minutes=4, seconds=5)),
    ("5m 30s", td(minutes=5, seconds=30)), ("", td(0)), ("  10s  ", td(seconds=10)),
    ("1s 1s", td(seconds=2)),
])
def test_legacy_form_is_the_fallback(text, expected):
    assert timespec.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["1w2d", "5M", "5", "m", "1.5s", "-5s", "5x", "PT5M 1s",
                                  "1 s"])
def test_bad_durations_are_errors_naming_the_value(text):
    with pytest.raises(ValueError, match="bad duration"):
        timespec.parse_duration(text)


def test_milliseconds_are_truncated():
    assert timespec.milliseconds(td(seconds=1, microseconds=999)) == 1000
    assert timespec.milliseconds(td(minutes=5)) == 300000


@pytest.mark.parametrize("duration", [td(0), td(seconds=1), td(minutes=5), td(hours=1, seconds=5),
                                      td(days=2, minutes=3), td(days=1, hours=2, minutes=3,
                                                                seconds=4)])
def test_rfc3339_rendering_parses_back(duration):
    assert timespec.parse_rfc3339_duration(timespec.to_rfc3339(duration)) == duration


@pytest.mark.parametrize("text", ["P365001D", "P3000000D", "52143w", "P99999999999999999999D"])
def test_durations_longer_than_1000_years_are_refused(text):
    """Timeouts are added to the current time; beyond the year 9999 that
    fails, so such a value must be refused where it is read, not later."""
    with pytest.raises(ValueError, match="bad duration"):
        timespec.parse_duration(text)


def test_1000_years_is_the_limit():
    assert timespec.parse_duration("P365000D") == timespec.MAX_DURATION
    assert timespec.from_milliseconds(timespec.milliseconds(timespec.MAX_DURATION)) \
        == timespec.MAX_DURATION
    with pytest.raises(ValueError, match="longer than 1000 years"):
        timespec.from_milliseconds(timespec.milliseconds(timespec.MAX_DURATION) + 1)
    with pytest.raises(ValueError, match="longer than 1000 years"):
        timespec.from_milliseconds(2 ** 64 - 1)  # the largest D-Bus "t"

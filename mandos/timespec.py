"""Durations as Mandos writes them: RFC 3339 durations and the older ``1w 2d`` form.

``clients.conf`` accepts an RFC 3339 Appendix A duration (``PT5M``,
``P1DT3M20S``, ``P2W``) and, for configurations written before Mandos
1.6.1, white-space separated tokens of an integer and one unit letter
(``5m``, ``1w 2d 3h 4m 5s``).  Years are 52 weeks and months 4 weeks, as
in the original.  Durations are kept as :class:`datetime.timedelta` and
given to D-Bus and timers as whole milliseconds.
"""

import datetime

_DAY = datetime.timedelta(days=1)
_DATE_UNITS = {"Y": 364 * _DAY, "M": 28 * _DAY, "D": _DAY}
_TIME_UNITS = {"H": datetime.timedelta(hours=1), "M": datetime.timedelta(minutes=1),
               "S": datetime.timedelta(seconds=1)}
#: The longest duration accepted anywhere.  Timeouts and intervals are
#: added to the current time, and a date beyond the year 9999 cannot be
#: represented: a longer duration would only fail later, in the middle of
#: the server's work.
MAX_DURATION = datetime.timedelta(days=1000 * 365)

_LEGACY_UNITS = {"s": datetime.timedelta(seconds=1), "m": datetime.timedelta(minutes=1),
                 "h": datetime.timedelta(hours=1), "d": _DAY, "w": 7 * _DAY}


def _components(text: str, order: str, units: dict) -> datetime.timedelta:
    """Sum ``nX`` components whose letters appear in ``order`` without gaps.

    The first component may start anywhere in ``order``; each following one
    must be the next letter (a date part may not skip months, a time part
    may not skip minutes).
    """
    total = datetime.timedelta(0)
    position = None
    i = 0
    while i < len(text):
        j = i
        while j < len(text) and "0" <= text[j] <= "9":
            j += 1
        if j == i or j == len(text):
            raise ValueError("a number and a unit expected")
        unit = text[j]
        index = order.find(unit)
        if index < 0 or (position is not None and index != position + 1):
            raise ValueError(f"unit {unit!r} not allowed here")
        position = index
        total += int(text[i:j]) * units[unit]
        i = j + 1
    if position is None:
        raise ValueError("empty part")
    return total


def parse_rfc3339_duration(text: str) -> datetime.timedelta:
    """Parse an RFC 3339 Appendix A duration; raises ValueError."""
    if not text.startswith("P") or not text.isascii():
        raise ValueError(f"not an RFC 3339 duration: {text!r}")
    body = text[1:]
    if body.endswith("W"):
        digits = body[:-1]
        if not digits.isdigit():
            raise ValueError(f"bad week duration: {text!r}")
        return int(digits) * 7 * _DAY
    date_part, t, time_part = body.partition("T")
    total = datetime.timedelta(0)
    try:
        if date_part:
            total += _components(date_part, "YMD", _DATE_UNITS)
        if t:
            total += _components(time_part, "HMS", _TIME_UNITS)
        elif not date_part:
            raise ValueError("empty duration")
    except ValueError as err:
        raise ValueError(f"bad RFC 3339 duration {text!r}: {err}") from None
    return total


def parse_legacy_duration(text: str) -> datetime.timedelta:
    """Parse the pre-1.6.1 form (``1w 2d 3h 4m 5s``); empty is zero."""
    total = datetime.timedelta(0)
    for token in text.split():
        number, unit = token[:-1], token[-1:]
        if not (number.isascii() and number.isdigit()) or unit not in _LEGACY_UNITS:
            raise ValueError(f"bad duration {text!r}: {token!r} is not a number and one "
                             "of the units s, m, h, d, w")
        total += int(number) * _LEGACY_UNITS[unit]
    return total


def parse_duration(text: str) -> datetime.timedelta:
    """A ``clients.conf`` duration: RFC 3339 first, else the older form."""
    try:
        duration = parse_rfc3339_duration(text)
    except (ValueError, OverflowError):
        try:
            duration = parse_legacy_duration(text)
        except (ValueError, OverflowError):
            raise ValueError(f"bad duration {text!r}: expected an RFC 3339 duration such "
                             "as PT5M or P1DT2H, or a list such as \"1w 2d 3h 4m 5s\""
                             ) from None
    return check_duration(duration, text)


def check_duration(duration: datetime.timedelta, text: object = None) -> datetime.timedelta:
    """``duration`` itself, or ValueError if it exceeds MAX_DURATION."""
    if duration > MAX_DURATION:
        what = duration if text is None else repr(text)
        raise ValueError(f"bad duration {what}: longer than 1000 years")
    return duration


def from_milliseconds(value: int) -> datetime.timedelta:
    """A duration given in milliseconds (D-Bus); ValueError beyond MAX_DURATION."""
    if value > milliseconds(MAX_DURATION):
        raise ValueError(f"bad duration {value} ms: longer than 1000 years")
    return datetime.timedelta(milliseconds=value)


def milliseconds(duration: datetime.timedelta) -> int:
    """Whole milliseconds (truncated), as D-Bus and timers use them."""
    return duration // datetime.timedelta(milliseconds=1)


def to_rfc3339(duration: datetime.timedelta) -> str:
    """Render a duration in RFC 3339 form (days, hours, minutes, seconds)."""
    seconds = int(duration.total_seconds())
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    text = "P" + (f"{days}D" if days else "")
    # No gaps are allowed inside the time part: 1H and 5S need 0M between.
    time_part = ((f"{hours}H" if hours else "")
                 + (f"{minutes}M" if minutes or (hours and seconds) else "")
                 + (f"{seconds}S" if seconds else ""))
    if time_part or not days:
        text += "T" + (time_part or "0S")
    return text

"""TIME arguments of mandos-ctl (SERVER.md §15.4), as whole milliseconds.

An RFC 3339 duration (``PT5M``, ``P1DT2H``, ``P2W``) as in ``clients.conf``;
otherwise the older form: one or more ``<digits><unit>`` tokens with the
units ``s``, ``m``, ``h``, ``d``, ``w``, separated by white space or not
(``5m``, ``1w 2d``, ``1w2d``).

Anything else is refused.  The original falls back to a parser that takes
bare digits as milliseconds and ignores every other character, so that
``300`` means 300 ms and ``abc`` means zero, which disables a client at
once when given as its timeout.
"""

from __future__ import annotations

import datetime
import re

from mandos import timespec

_UNITS = {"s": datetime.timedelta(seconds=1), "m": datetime.timedelta(minutes=1),
          "h": datetime.timedelta(hours=1), "d": datetime.timedelta(days=1),
          "w": datetime.timedelta(weeks=1)}
_TOKEN = re.compile(r"\s*([0-9]+)([smhdw])")
_OLDER_FORM = re.compile(r"(?:\s*[0-9]+[smhdw])+\s*")

ACCEPTED_FORMS = ("an RFC 3339 duration such as PT5M, PT1H30M or P1DT2H, or numbers "
                  "with the units s, m, h, d, w such as 5m, 90s or \"1w 2d\"")


def parse_time(text: str) -> int:
    """Milliseconds of a TIME argument; ValueError naming the value otherwise."""
    try:
        try:
            duration = timespec.parse_rfc3339_duration(text)
        except ValueError:
            if not _OLDER_FORM.fullmatch(text):
                raise ValueError(f"invalid TIME {text!r}: expected {ACCEPTED_FORMS}") from None
            duration = sum((int(number) * _UNITS[unit]
                            for number, unit in _TOKEN.findall(text)), datetime.timedelta(0))
    except OverflowError:
        raise ValueError(f"invalid TIME {text!r}: too long") from None
    if duration > timespec.MAX_DURATION:
        raise ValueError(f"invalid TIME {text!r}: longer than 1000 years")
    return timespec.milliseconds(duration)

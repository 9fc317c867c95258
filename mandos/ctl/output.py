"""The client table and the JSON dump of mandos-ctl (SERVER.md §15.2, §15.3).

Pure functions of the client property dictionaries as D-Bus gives them
(property name to plain value), in the order they are to be shown.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

# (D-Bus property, table header), in the order of the verbose table and the JSON dump.
COLUMNS = (
    ("Name", "Name"),
    ("Enabled", "Enabled"),
    ("Timeout", "Timeout"),
    ("LastCheckedOK", "Last Successful Check"),
    ("Created", "Created"),
    ("Interval", "Interval"),
    ("Host", "Host"),
    ("KeyID", "Key ID"),
    ("Fingerprint", "Fingerprint"),
    ("CheckerRunning", "Check Is Running"),
    ("LastEnabled", "Last Enabled"),
    ("ApprovalPending", "Approval Is Pending"),
    ("ApprovedByDefault", "Approved By Default"),
    ("LastApprovalRequest", "Last Approval Request"),
    ("ApprovalDelay", "Approval Delay"),
    ("ApprovalDuration", "Approval Duration"),
    ("Checker", "Checker"),
    ("ExtendedTimeout", "Extended Timeout"),
    ("Expires", "Expires"),
    ("LastCheckerStatus", "Last Checker Status"),
)
ALL_KEYS = tuple(key for key, _ in COLUMNS)
DEFAULT_KEYS = ALL_KEYS[:4]
HEADERS = dict(COLUMNS)
DURATION_KEYS = frozenset({"Timeout", "Interval", "ApprovalDelay", "ApprovalDuration",
                           "ExtendedTimeout"})

Client = Mapping[str, object]


def duration_cell(milliseconds: int) -> str:
    """``[DAYS"T"]HH:MM:SS``: ``00:05:00``, ``1T02:03:05``; fractions dropped."""
    seconds = milliseconds // 1000
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return (f"{days}T" if days else "") + f"{hours:02}:{minutes:02}:{seconds:02}"


def cell(key: str, value: object) -> str:
    """One table cell: ``Yes``/``No``, a duration, or the value as it is."""
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if key in DURATION_KEYS:
        return duration_cell(int(value))  # type: ignore[call-overload]
    return str(value)


def table(clients: Iterable[Client], verbose: bool = False) -> str:
    """The table: a header line and one line per client, each ending in a newline.

    Every column is as wide as its widest cell, header included; cells are
    left-aligned and padded with spaces, also in the last column.
    """
    keys = ALL_KEYS if verbose else DEFAULT_KEYS
    rows = [[HEADERS[key] for key in keys]]
    rows += [[cell(key, client[key]) for key in keys] for client in clients]
    widths = [max(len(row[i]) for row in rows) for i in range(len(keys))]
    return "".join(" ".join(text.ljust(width) for text, width in zip(row, widths)) + "\n"
                   for row in rows)


def dump_json(clients: Iterable[Client]) -> str:
    """The JSON dump: an object by client name of the 20 table values, and a newline."""
    data = {client["Name"]: {key: client[key] for key in ALL_KEYS} for client in clients}
    return json.dumps(data, indent=4, separators=(",", ": ")) + "\n"

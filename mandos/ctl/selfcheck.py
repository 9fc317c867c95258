"""``mandos-ctl --check``: does this installation parse and print as it must?

Runs the duration parser, the usage rules, the table and the JSON dump
against known cases, and loads the D-Bus library; prints one ``ok`` or
``FAIL`` line per check.  Needs no server.
"""

from __future__ import annotations

from mandos.ctl import durations, options, output

# The example of SERVER.md §15.2.
_EXAMPLE_CLIENTS = (
    {"Name": "web1", "Enabled": True, "Timeout": 300000,
     "LastCheckedOK": "2024-05-01T10:00:00.123456"},
    {"Name": "db-server", "Enabled": False, "Timeout": 93785000, "LastCheckedOK": ""},
)
_EXAMPLE_TABLE = ("Name      Enabled Timeout    Last Successful Check     \n"
                  "web1      Yes     00:05:00   2024-05-01T10:00:00.123456\n"
                  "db-server No      1T02:03:05                           \n")
_TIMES = {"PT5M": 300000, "P1DT3M20S": 86600000, "P2W": 1209600000, "5m": 300000,
          "90s": 90000, "1w 2d": 777600000, "1w2d": 777600000}
_BAD_TIMES = ("300", "abc", "", "PT", "5 m")
_USAGE = {("-e",): True, ("-e", "web1"): False, ("-v", "-e", "web1"): True,
          ("-j", "-v"): True, ("-a",): True, ("-V", "a", "b"): True,
          ("-r", "-e", "web1"): True, ("-r", "-D", "web1"): False}


def _times() -> None:
    for text, expected in _TIMES.items():
        if durations.parse_time(text) != expected:
            raise AssertionError(f"{text!r} is not {expected} ms")
    for text in _BAD_TIMES:
        try:
            durations.parse_time(text)
        except ValueError:
            continue
        raise AssertionError(f"{text!r} was accepted")


def _usage() -> None:
    parser = options.make_parser()
    for argv, refused in _USAGE.items():
        if (options.usage_problem(parser.parse_args(list(argv))) is not None) != refused:
            raise AssertionError(f"{' '.join(argv)} is {'not ' if refused else ''}refused")


def _table() -> None:
    text = output.table(_EXAMPLE_CLIENTS)
    if text != _EXAMPLE_TABLE:
        raise AssertionError(f"got {text!r}")


def _json() -> None:
    client = {key: "" for key in output.ALL_KEYS}
    client.update(Name="a", Enabled=True, Timeout=1000)
    text = output.dump_json([client])
    lines = text.splitlines()
    if (lines[:5] != ['{', '    "a": {', '        "Name": "a",', '        "Enabled": true,',
                      '        "Timeout": 1000,']
            or lines[-2:] != ["    }", "}"] or not text.endswith("}\n")
            or len(lines) != 4 + len(output.ALL_KEYS)):
        raise AssertionError(f"got {text!r}")


def _dbus() -> None:
    from mandos.ctl import bus
    line = bus.describe_call("/clients/a", bus.PROPERTIES_INTERFACE, "Set",
                             [bus.CLIENT_INTERFACE, "Secret", b"s3cret"])
    if "s3cret" in line:
        raise AssertionError(f"the secret shows in {line!r}")


CHECKS = (
    ("TIME arguments: RFC 3339 and 5m / 1w 2d accepted, bare numbers refused", _times),
    ("usage rules", _usage),
    ("table layout and duration cells (SERVER.md §15.2 example)", _table),
    ("JSON dump layout", _json),
    ("D-Bus library loads; --debug lines withhold secrets", _dbus),
)


def run() -> int:
    """Run every check, print a line for each; 0 if all passed, else 1."""
    failures = 0
    for what, check in CHECKS:
        try:
            check()
            error = None
        except Exception as err:  # a check that breaks is a failed check
            error = err
        failures += error is not None
        print(f"{'FAIL' if error else 'ok  '} {what}" + (f": {error}" if error else ""))
    return 1 if failures else 0

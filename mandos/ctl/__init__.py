"""mandos-ctl: control a running Mandos server over D-Bus (SERVER.md §15).

One concern per module:

``options``    the command line: argparse parser, the actions in order, the
               usage rules (status 2)
``durations``  TIME arguments (RFC 3339, or ``5m``/``1w 2d``) to milliseconds
``output``     the client table and the JSON dump, as pure functions of the
               client property dictionaries
``bus``        the D-Bus access: list clients, set properties, approve or
               deny, remove; every failure becomes one exception type
``main``       the run: parse, connect, select clients by name, run the
               actions in order, print
``selfcheck``  ``--check``: the parser and the output against known cases
"""

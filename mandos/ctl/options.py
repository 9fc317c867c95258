"""The command line of mandos-ctl (SERVER.md §15.1).

``parse(argv)`` gives an :class:`argparse.Namespace` with ``actions``, the
actions in command-line order, and the selection and output options
(``client``, ``all``, ``verbose``, ``dump_json``, ``debug``, ``check``).
Bad usage ends the program with status 2 through
:meth:`argparse.ArgumentParser.error`, as ``--help`` and ``--version``
end it with status 0: callers that must not exit catch ``SystemExit``.

Deliberate differences from the original: a TIME that is not one of the
forms of :mod:`mandos.ctl.durations` is a usage error, and
``--is-enabled`` needs exactly one client name (the original also takes
``--all`` and then looks at whichever client the server lists first).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
from typing import Callable

import mandos
from mandos.ctl import durations


class Kind(enum.Enum):
    """What an action does on the server."""

    SET = "set a property"
    APPROVE = "approve or deny"
    REMOVE = "remove"
    IS_ENABLED = "test Enabled"


class SecretBytes:
    """The content of a ``--secret`` file; its repr and str never show it."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __bytes__(self) -> bytes:
        return self._data

    def __repr__(self) -> str:
        return f"<secret, {len(self._data)} bytes>"

    __str__ = __repr__


@dataclasses.dataclass(frozen=True)
class Action:
    """One action of the command line, for each selected client."""

    option: str  # the long option that asked for it
    kind: Kind
    prop: str = ""  # the property, for Kind.SET
    value: object = None  # the property value, or the decision for Kind.APPROVE


ENABLE = Action("--enable", Kind.SET, "Enabled", True)
DISABLE = Action("--disable", Kind.SET, "Enabled", False)
BUMP_TIMEOUT = Action("--bump-timeout", Kind.SET, "LastCheckedOK", "")
START_CHECKER = Action("--start-checker", Kind.SET, "CheckerRunning", True)
STOP_CHECKER = Action("--stop-checker", Kind.SET, "CheckerRunning", False)
IS_ENABLED = Action("--is-enabled", Kind.IS_ENABLED)
REMOVE = Action("--remove", Kind.REMOVE)
APPROVE_BY_DEFAULT = Action("--approve-by-default", Kind.SET, "ApprovedByDefault", True)
DENY_BY_DEFAULT = Action("--deny-by-default", Kind.SET, "ApprovedByDefault", False)
APPROVE = Action("--approve", Kind.APPROVE, value=True)
DENY = Action("--deny", Kind.APPROVE, value=False)


def _setter(option: str, prop: str, convert: Callable[[str], object]):
    """An argparse ``type`` that turns the option's argument into an Action."""
    def action(text: str) -> Action:
        try:
            return Action(option, Kind.SET, prop, convert(text))
        except (ValueError, OSError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return action


def _time(text: str) -> int:
    return durations.parse_time(text)


def read_secret(filename: str) -> SecretBytes:
    """The bytes of ``filename`` (``-``: standard input), kept out of sight."""
    if filename == "-":
        return SecretBytes(sys.stdin.buffer.read())
    try:
        with open(filename, "rb") as file:
            return SecretBytes(file.read())
    except OSError as err:
        raise OSError(f"cannot read {filename!r}: {err.strerror}") from None


def make_parser() -> argparse.ArgumentParser:
    """The argparse parser of mandos-ctl (without the usage rules)."""
    parser = argparse.ArgumentParser(
        prog="mandos-ctl", description="Control a running Mandos server over D-Bus.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {mandos.__version__}",
                        help="show the version number and exit")
    parser.add_argument("-a", "--all", action="store_true",
                        help="select all clients (with an action)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show all columns of the table")
    parser.add_argument("-j", "--dump-json", action="store_true",
                        help="dump the clients' data as JSON")

    def flag(group, *names: str, const: Action, help: str) -> None:
        group.add_argument(*names, dest="actions", action="append_const", const=const,
                           help=help)

    def valued(*names: str, metavar: str, type, help: str) -> None:
        parser.add_argument(*names, dest="actions", action="append", metavar=metavar,
                            type=type, help=help)

    enable_disable = parser.add_mutually_exclusive_group()
    flag(enable_disable, "-e", "--enable", const=ENABLE, help="enable the clients")
    flag(enable_disable, "-d", "--disable", const=DISABLE, help="disable the clients")
    flag(parser, "-b", "--bump-timeout", const=BUMP_TIMEOUT,
         help="count as a successful check now")
    start_stop = parser.add_mutually_exclusive_group()
    flag(start_stop, "--start-checker", const=START_CHECKER, help="start a checker now")
    flag(start_stop, "--stop-checker", const=STOP_CHECKER,
         help="stop the running checker")
    flag(parser, "-V", "--is-enabled", const=IS_ENABLED,
         help="exit with status 0 if the client is enabled, else 1")
    flag(parser, "-r", "--remove", const=REMOVE, help="remove the clients from the server")
    valued("-c", "--checker", metavar="COMMAND", type=_setter("--checker", "Checker", str),
           help="set the checker command")
    valued("-t", "--timeout", metavar="TIME", type=_setter("--timeout", "Timeout", _time),
           help="set the timeout")
    valued("--extended-timeout", metavar="TIME",
           type=_setter("--extended-timeout", "ExtendedTimeout", _time),
           help="set the extended timeout")
    valued("-i", "--interval", metavar="TIME",
           type=_setter("--interval", "Interval", _time), help="set the checker interval")
    by_default = parser.add_mutually_exclusive_group()
    flag(by_default, "--approve-by-default", const=APPROVE_BY_DEFAULT,
         help="approve requests when the approval delay runs out")
    flag(by_default, "--deny-by-default", const=DENY_BY_DEFAULT,
         help="deny requests when the approval delay runs out")
    valued("--approval-delay", metavar="TIME",
           type=_setter("--approval-delay", "ApprovalDelay", _time),
           help="set the delay before a request is approved or denied by default")
    valued("--approval-duration", metavar="TIME",
           type=_setter("--approval-duration", "ApprovalDuration", _time),
           help="set how long one approval lasts")
    valued("-H", "--host", metavar="STRING", type=_setter("--host", "Host", str),
           help="set the host name or address for the checker")
    valued("-s", "--secret", metavar="FILENAME",
           type=_setter("--secret", "Secret", read_secret),
           help="set the secret to the content of the file")
    approve_deny = parser.add_mutually_exclusive_group()
    flag(approve_deny, "-A", "--approve", const=APPROVE,
         help="approve the clients' waiting requests")
    flag(approve_deny, "-D", "--deny", const=DENY, help="deny the clients' waiting requests")
    parser.add_argument("--debug", action="store_true",
                        help="show every D-Bus call on standard error")
    parser.add_argument("--check", action="store_true", help="run a self-check and exit")
    parser.add_argument("client", nargs="*", help="client name")
    parser.set_defaults(actions=[])
    return parser


def usage_problem(options: argparse.Namespace) -> str | None:
    """The first usage rule the options break, or None (SERVER.md §15.1)."""
    actions = options.actions
    kinds = {action.kind for action in actions}
    if actions and not (options.client or options.all):
        return "actions require client names or --all"
    if options.verbose and actions:
        return "--verbose cannot be combined with actions"
    if options.dump_json and (options.verbose or actions):
        return "--dump-json cannot be combined with --verbose or actions"
    if options.all and not actions:
        return "--all requires an action"
    if Kind.IS_ENABLED in kinds and len(options.client) != 1:
        return "--is-enabled requires exactly one client name"
    if Kind.REMOVE in kinds and len(actions) > 1 and DENY not in actions:
        return "--remove can only be combined with --deny"
    return None


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse the command line and apply the usage rules; exits on bad usage.

    ``--check`` skips the usage rules.
    """
    parser = make_parser()
    options = parser.parse_args(argv)
    if not options.check:
        problem = usage_problem(options)
        if problem:
            parser.error(problem)
    return options

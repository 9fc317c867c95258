"""The run of mandos-ctl: parse, connect, select clients, act or print (SERVER.md §15).

Exit status: 0 on success (and for ``--is-enabled`` on an enabled client),
1 when the server cannot be reached, a client name is unknown, a D-Bus
call fails or ``--is-enabled`` finds the client disabled; 2 for bad usage.
Messages go to standard error as plain lines.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mandos.ctl import options, output
from mandos.ctl.options import DENY, REMOVE, Action, Kind

if TYPE_CHECKING:
    from mandos.ctl.bus import MandosBus

log = logging.getLogger("mandos.ctl")


class ClientNotFound(Exception):
    """A client name given on the command line is not on the server."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Client not found on server: {name!r}")


def select(clients: dict[str, dict[str, object]], names: Sequence[str]
           ) -> dict[str, dict[str, object]]:
    """The clients named (exact ``Name``, in the order named), or all without names."""
    if not names:
        return dict(clients)
    by_name: dict[object, str] = {}
    for path, properties in clients.items():
        by_name.setdefault(properties["Name"], path)
    selected: dict[str, dict[str, object]] = {}
    for name in names:
        if name not in by_name:
            raise ClientNotFound(name)
        selected[by_name[name]] = clients[by_name[name]]
    return selected


def execution_order(actions: Sequence[Action]) -> list[Action]:
    """Command-line order, except that a ``--deny`` given after ``--remove`` runs before it."""
    if REMOVE not in actions:
        return list(actions)
    first_remove = actions.index(REMOVE)
    later = actions[first_remove:]
    return ([*actions[:first_remove], *(action for action in later if action == DENY)]
            + [action for action in later if action != DENY])


async def act(mandos: MandosBus, opts: argparse.Namespace) -> int:
    """List, select, and run the actions or print; the exit status."""
    selected = select(await mandos.clients(), opts.client)
    actions = execution_order(opts.actions)
    if not actions:
        if opts.dump_json:
            sys.stdout.write(output.dump_json(selected.values()))
        else:
            sys.stdout.write(output.table(selected.values(), opts.verbose))
        return 0
    for action in actions:
        if action.kind is Kind.IS_ENABLED:
            # The state listed before any action of this run, as in the original.
            return 0 if next(iter(selected.values()))["Enabled"] else 1
        for path in selected:
            if action.kind is Kind.REMOVE:
                await mandos.remove(path)
            elif action.kind is Kind.APPROVE:
                await mandos.approve(path, bool(action.value))
            else:
                await mandos.set_property(path, action.prop, action.value)
    return 0


async def run(opts: argparse.Namespace) -> int:
    """Everything after parsing; the exit status."""
    from mandos.ctl import bus  # dbus-fast takes 60 ms to import: only when needed

    try:
        mandos = await bus.MandosBus.connect()
        try:
            return await act(mandos, opts)
        finally:
            mandos.close()
    except (bus.ServerError, ClientNotFound) as err:
        log.critical("%s", err)
        return 1


def main(argv: list[str] | None = None) -> int:
    """mandos-ctl; returns the exit status."""
    try:
        opts = options.parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as done:  # --help, --version, usage errors
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    if opts.check:
        from mandos.ctl import selfcheck
        return selfcheck.run()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if opts.debug else logging.INFO)
    log.propagate = False
    try:
        return asyncio.run(run(opts))
    finally:
        log.removeHandler(handler)

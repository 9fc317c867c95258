"""The D-Bus side of mandos-ctl: the server's API as mandos-ctl uses it (SERVER.md §14).

Use::

    mandos = await MandosBus.connect()       # the system bus
    try:
        clients = await mandos.clients()     # {object path: {property: value}}
        await mandos.set_property(path, "Enabled", True)
        await mandos.approve(path, False)
        await mandos.remove(path)
    finally:
        mandos.close()

Every failure is a :class:`ServerError` whose text is the message for the
administrator.  With ``logging`` at DEBUG, each call is logged (method,
path, interface, arguments); a value written to ``Secret`` never is.
"""

from __future__ import annotations

import asyncio
import logging

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import AuthError, DBusError

log = logging.getLogger(__name__)

BUS_NAME = "se.recompile.Mandos"
SERVER_PATH = "/"
SERVER_INTERFACE = "se.recompile.Mandos"
CLIENT_INTERFACE = "se.recompile.Mandos.Client"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_INTERFACE = "org.freedesktop.DBus.ObjectManager"

# The D-Bus type of every writable client property.
PROPERTY_SIGNATURES = {
    "ApprovalDelay": "t", "ApprovalDuration": "t", "ApprovedByDefault": "b",
    "Checker": "s", "CheckerRunning": "b", "Enabled": "b", "ExtendedTimeout": "t",
    "Host": "s", "Interval": "t", "LastCheckedOK": "s", "Secret": "ay", "Timeout": "t",
}
# Errors that mean nobody owns the bus name: the server is not running.
_NO_SERVER_ERRORS = frozenset({"org.freedesktop.DBus.Error.ServiceUnknown",
                               "org.freedesktop.DBus.Error.NameHasNoOwner"})
CALL_TIMEOUT = 25.0  # seconds, as libdbus waits by default


class ServerError(Exception):
    """The server cannot be reached or refused a call; str() is the message."""


def could_not_connect(reason: object) -> ServerError:
    """The error for a bus that cannot be reached or a server that is not on it."""
    return ServerError(f"Could not connect to Mandos server: {reason}")


def failed_to_access(reason: object) -> ServerError:
    """The error for any other failed call."""
    return ServerError(f"Failed to access Mandos server through D-Bus:\n{reason}")


def describe_call(path: str, interface: str, member: str, body: list) -> str:
    """The --debug line of one call; the value of a ``Secret`` write is withheld."""
    values = [value.value if isinstance(value, Variant) else value for value in body]
    shown = [repr(value) for value in values]
    if member == "Set" and len(values) == 3 and values[1] == "Secret":
        shown[2] = "<secret withheld>"
    return f"D-Bus: {BUS_NAME}:{path}:{interface}.{member}({', '.join(shown)})"


def _reason(err: BaseException) -> str:
    return str(err) or type(err).__name__


class MandosBus:
    """A connection to the system bus, for calls to the Mandos server."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus

    @classmethod
    async def connect(cls) -> "MandosBus":
        """Connect to the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` is honoured)."""
        try:
            bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(),
                                         CALL_TIMEOUT)
        except (OSError, ValueError, AuthError, DBusError, asyncio.TimeoutError) as err:
            raise could_not_connect(_reason(err)) from None
        return cls(bus)

    def close(self) -> None:
        self._bus.disconnect()

    async def _call(self, path: str, interface: str, member: str, signature: str = "",
                    body: list | None = None) -> list:
        body = body or []
        log.debug("%s", describe_call(path, interface, member, body))
        message = Message(destination=BUS_NAME, path=path, interface=interface,
                          member=member, signature=signature, body=body)
        try:
            reply = await asyncio.wait_for(self._bus.call(message), CALL_TIMEOUT)
        except asyncio.TimeoutError:
            raise failed_to_access(f"no reply to {member} within {CALL_TIMEOUT:g} s") from None
        except (OSError, EOFError, ValueError, DBusError) as err:
            raise failed_to_access(_reason(err)) from None
        if reply is None:
            return []
        if reply.message_type is not MessageType.ERROR:
            return reply.body
        has_text = reply.body and isinstance(reply.body[0], str)
        text = reply.body[0] if has_text else reply.error_name
        if reply.error_name in _NO_SERVER_ERRORS:
            raise could_not_connect(text)
        raise failed_to_access(text)

    async def clients(self) -> dict[str, dict[str, object]]:
        """Every client: object path to its properties, in the server's order."""
        (objects,) = await self._call(SERVER_PATH, OBJECT_MANAGER_INTERFACE,
                                      "GetManagedObjects")
        return {path: {name: variant.value
                       for name, variant in interfaces[CLIENT_INTERFACE].items()}
                for path, interfaces in objects.items() if CLIENT_INTERFACE in interfaces}

    async def set_property(self, path: str, name: str, value: object) -> None:
        """Set a client property, with the D-Bus type the server expects."""
        signature = PROPERTY_SIGNATURES[name]
        if signature == "ay":
            value = bytes(value)  # type: ignore[call-overload]
        await self._call(path, PROPERTIES_INTERFACE, "Set", "ssv",
                         [CLIENT_INTERFACE, name, Variant(signature, value)])

    async def approve(self, path: str, approved: bool) -> None:
        """Approve (True) or deny (False) the client's waiting requests."""
        await self._call(path, CLIENT_INTERFACE, "Approve", "b", [approved])

    async def remove(self, path: str) -> None:
        """Remove the client from the server."""
        await self._call(SERVER_PATH, SERVER_INTERFACE, "RemoveClient", "o", [path])

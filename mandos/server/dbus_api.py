"""The D-Bus control interface of the server (SERVER.md §14).

``mandos-ctl`` and ``mandos-monitor`` talk to the server on the system bus
under the name ``se.recompile.Mandos`` (and the deprecated
``se.bsnet.fukt.Mandos``): the server object ``/`` lists and removes
clients and announces them, each client has an object
``/clients/NAME'`` (:mod:`mandos.server.dbus_client`).

Use::

    service = await dbus_api.start(registry)      # None: D-Bus is off this run
    ...
    await service.aclose()                        # or service.close()

The service follows the registry and every client as an observer and runs
on the server's event loop.

dbus-fast (1.84, as in Debian 12) is used for the connection and the wire
format only; method calls are dispatched here, for four reasons its object
layer cannot be bent to: it announces every exported interface in a
separate ``InterfacesAdded`` signal from the object's own path (the
original sends one, from ``/``, naming four interfaces), it has no
annotations in its introspection data, its ``GetAll("")`` is an error and
its ``GetManagedObjects`` lists the server object too.

Every outgoing message goes through an :class:`~mandos.server.dbus_outbox.Outbox`
(dbus-fast 1.84 can reorder messages and can drop the connection under load).

Deliberate differences from the original (each has a test):
- a property write whose value has the wrong D-Bus type is refused with
  ``org.freedesktop.DBus.Error.InvalidArgs`` (integers of any type are
  taken for durations and booleans, as dbus-python sends ``i``); the
  original converts what it can (``str(5)`` for ``Host``) and fails with a
  Python exception name otherwise;
- a method call with the wrong signature is an unknown method;
- a client whose object path would be invalid, or the same as another
  client's, is logged and left off the bus (the original fails on it);
- when the bus connection is lost, that is logged and the server runs on
  without D-Bus.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from dbus_fast import BusType, Message, MessageFlag, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.validators import is_object_path_valid

from mandos.server.client import Client
from mandos.server.dbus_client import MANAGED_INTERFACES, ClientObject, object_path
from mandos.server.dbus_objects import (
    DEPRECATED, FAILED, INTROSPECTABLE, INTROSPECTABLE_INTERFACE, KEY_ERROR, OBJECT_MANAGER,
    OBJECT_MANAGER_INTERFACE, PEER, Arg, CallError, Interface, Method, Signal,
    introspection_xml, unknown_method)
from mandos.server.dbus_outbox import Outbox
from mandos.server.registry import ClientRegistry, ServerObserver

log = logging.getLogger(__name__)

BUS_NAME = "se.recompile.Mandos"
OLD_BUS_NAME = "se.bsnet.fukt.Mandos"
SERVER_INTERFACE = "se.recompile.Mandos"
SERVER_ALIAS = "se.bsnet.fukt.Mandos"
SERVER_PATH = "/"

_DEPRECATED = ((DEPRECATED, "true"),)

SERVER_INTERFACE_DESCRIPTION = Interface(
    SERVER_INTERFACE,
    methods=(
        Method("GetAllClients", (Arg("ao", None, "out"),), _DEPRECATED),
        Method("GetAllClientsWithProperties", (Arg("a{oa{sv}}", None, "out"),), _DEPRECATED),
        Method("RemoveClient", (Arg("o", "object_path", "in"),)),
    ),
    signals=(
        Signal("ClientAdded", (Arg("o", "objpath"),)),
        Signal("ClientNotFound", (Arg("s", "key_id"), Arg("s", "address"))),
        Signal("ClientRemoved", (Arg("o", "objpath"), Arg("s", "name")), _DEPRECATED),
    ))
SERVER_ALIAS_DESCRIPTION = SERVER_INTERFACE_DESCRIPTION.deprecated_alias(SERVER_ALIAS)

_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


class DBusService(ServerObserver):
    """The server's presence on D-Bus: the server object and one object per client.

    Created by :func:`start`.  It registers itself as observer on the
    registry and on every client it shows.
    """

    def __init__(self, bus: MessageBus, registry: ClientRegistry) -> None:
        self.bus = bus
        self.registry = registry
        self.objects: dict[str, ClientObject] = {}  # object path -> object, registry order
        self._outbox = Outbox(bus)
        self._closed = False
        self._watch: asyncio.Task | None = None
        bus.add_message_handler(self._on_message)

    # -- life cycle -------------------------------------------------------

    def _publish(self) -> None:
        """Show every client and follow the registry from now on."""
        self.registry.observers.append(self)
        for client in self.registry:
            self.client_added(client)
        self._watch = asyncio.get_running_loop().create_task(self._watch_connection())

    async def _watch_connection(self) -> None:
        """If the bus goes away, say so and carry on without it."""
        try:
            await self.bus.wait_for_disconnect()
            reason = ""
        except Exception as err:
            reason = f": {err}"
        if not self._closed:
            log.error("Lost the D-Bus connection%s; D-Bus is off from now on", reason)
            self._watch = None
            self.close()

    def close(self) -> None:
        """Leave the bus now: stop observing, drop the connection (and the bus names)."""
        if self._closed:
            return
        self._closed = True
        if self in self.registry.observers:
            self.registry.observers.remove(self)
        for obj in self.objects.values():
            obj.detach()
        self.objects.clear()
        self.bus.remove_message_handler(self._on_message)
        self._outbox.close()
        if self.bus.connected:
            self.bus.disconnect()
        if self._watch is not None:
            self._watch.cancel()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Send what is still queued (at most ``timeout`` seconds), then :meth:`close`."""
        if not self._closed:
            await self._outbox.drain(timeout)
        self.close()

    # -- sending ----------------------------------------------------------

    def emit(self, path: str, interface: str, member: str, signature: str, body: list) -> None:
        """Send a signal."""
        if self._closed:
            return
        self._outbox.send(Message.new_signal(path, interface, member, signature, body))

    def _emit_server_signal(self, member: str, signature: str, body: list) -> None:
        # Every server signal goes out on the interface, then on its alias.
        for interface in (SERVER_INTERFACE, SERVER_ALIAS):
            self.emit(SERVER_PATH, interface, member, signature, body)

    # -- the registry's events (ServerObserver) -----------------------------

    def client_added(self, client: Client) -> None:
        """Put ``client`` on the bus: InterfacesAdded, then ClientAdded."""
        path = object_path(client.name)
        if not is_object_path_valid(path):
            log.error("Client %s is not shown on D-Bus: %r is not a valid object path "
                      "(only letters, digits, '_', '.' and '-' work in names)",
                      client.name, path)
            return
        if path in self.objects:
            log.error("Client %s is not shown on D-Bus: its object path %s is already "
                      "that of client %s", client.name, path, self.objects[path].client.name)
            return
        obj = ClientObject(client, path, self.emit)
        self.objects[path] = obj
        self.emit(SERVER_PATH, OBJECT_MANAGER, "InterfacesAdded", "oa{sa{sv}}",
                  [path, obj.interfaces_and_properties()])
        self._emit_server_signal("ClientAdded", "o", [path])
        obj.attach()

    def client_removed(self, client: Client) -> None:
        """Take ``client`` off the bus: InterfacesRemoved, then ClientRemoved."""
        obj = self._object_of(client)
        if obj is None:
            return
        obj.detach()
        del self.objects[obj.path]
        self.emit(SERVER_PATH, OBJECT_MANAGER, "InterfacesRemoved", "oas",
                  [obj.path, list(MANAGED_INTERFACES)])
        self._emit_server_signal("ClientRemoved", "os", [obj.path, client.name])

    def client_not_found(self, key_id: str, address: str) -> None:
        """An unknown client connected: ClientNotFound(key ID, address)."""
        self._emit_server_signal("ClientNotFound", "ss", [str(key_id), str(address)])

    def _object_of(self, client: Client) -> ClientObject | None:
        return next((obj for obj in self.objects.values() if obj.client is client), None)

    # -- incoming calls ---------------------------------------------------

    def _on_message(self, message: Message) -> bool | None:
        """Answer every method call to this connection (dbus-fast's own handlers see none)."""
        if message.message_type is not MessageType.METHOD_CALL:
            return None
        try:
            signature, body = self._dispatch(message)
        except CallError as err:
            reply = Message.new_error(message, err.name, err.text)
        except Exception as err:  # a bug; answer like dbus-python would
            log.exception("D-Bus call %s.%s on %s failed", message.interface, message.member,
                          message.path)
            reply = Message.new_error(message, f"org.freedesktop.DBus.Python."
                                               f"{type(err).__name__}", str(err))
        else:
            reply = Message.new_method_return(message, signature, body)
        if not message.flags & MessageFlag.NO_REPLY_EXPECTED:
            self._outbox.send(reply)
        return True

    def _dispatch(self, message: Message) -> tuple[str, list]:
        path, interface, member = message.path, message.interface, message.member
        signature, body = message.signature, message.body
        if interface == PEER:
            return self._peer(member, signature)
        if path == SERVER_PATH:
            return self._server_call(interface, member, signature, body)
        obj = self.objects.get(path)
        if obj is not None:
            return obj.call(interface, member, signature, body)
        if interface in (INTROSPECTABLE, None) and member == "Introspect" and signature == "":
            return "s", [self._introspect_inner(path)]
        raise unknown_method(interface, member, signature)

    def _server_call(self, interface: str | None, member: str, signature: str,
                     body: list) -> tuple[str, list]:
        if interface is None:
            interface = next((described.name for described in (
                SERVER_INTERFACE_DESCRIPTION, OBJECT_MANAGER_INTERFACE,
                INTROSPECTABLE_INTERFACE) if described.method(member)), None)
        if interface in (SERVER_INTERFACE, SERVER_ALIAS):
            if member == "RemoveClient" and signature in ("o", "s"):
                self._remove_client(body[0])
                return "", []
            if member == "GetAllClients" and signature == "":
                return "ao", [list(self.objects)]
            if member == "GetAllClientsWithProperties" and signature == "":
                return "a{oa{sv}}", [{path: obj.properties()
                                      for path, obj in self.objects.items()}]
        elif interface == OBJECT_MANAGER:
            if member == "GetManagedObjects" and signature == "":
                return "a{oa{sa{sv}}}", [{path: obj.interfaces_and_properties()
                                          for path, obj in self.objects.items()}]
        elif interface == INTROSPECTABLE and member == "Introspect" and signature == "":
            return "s", [introspection_xml(SERVER_PATH, [
                INTROSPECTABLE_INTERFACE, OBJECT_MANAGER_INTERFACE,
                SERVER_INTERFACE_DESCRIPTION, SERVER_ALIAS_DESCRIPTION],
                ["clients"] if self.objects else [])]
        raise unknown_method(interface, member, signature)

    def _remove_client(self, path: str) -> None:
        """RemoveClient: forget the client, quietly disabled (no change signals)."""
        obj = self.objects.get(path)
        if obj is None:
            raise CallError(KEY_ERROR, f"KeyError: {path!r}")
        obj.detach()  # the original leaves the bus before disabling the client
        self.registry.remove(obj.client.name)
        if obj.path in self.objects:  # the registry did not report the removal
            self.client_removed(obj.client)

    def _introspect_inner(self, path: str) -> str:
        """Introspection of a path with no object: only the child nodes below it."""
        prefix = path.rstrip("/") + "/"
        children = sorted({sub[len(prefix):].split("/")[0] for sub in self.objects
                           if sub.startswith(prefix)})
        return introspection_xml(None, [], children)

    @staticmethod
    def _peer(member: str, signature: str) -> tuple[str, list]:
        if member == "Ping" and signature == "":
            return "", []
        if member == "GetMachineId" and signature == "":
            for name in _MACHINE_ID_FILES:
                try:
                    return "s", [Path(name).read_text().strip()]
                except OSError:
                    continue
            raise CallError(FAILED, "no machine ID")
        raise unknown_method(PEER, member, signature)


async def start(registry: ClientRegistry, bus_address: str | None = None,
                timeout: float = 10.0) -> DBusService | None:
    """Connect to the system bus (or ``bus_address``), take both names, show the clients.

    Returns None, after logging an error, when D-Bus cannot be used this
    run: no bus, or either name not available (another server, or the bus
    policy says no).  The server then runs on without it.
    """
    bus = None
    try:
        bus = MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM)
        await asyncio.wait_for(bus.connect(), timeout)
    except Exception as err:  # whatever it is, the server must run on
        log.error("D-Bus disabled: cannot connect to the system bus: %s", err)
        if bus is not None:
            bus.disconnect()
        return None
    service = DBusService(bus, registry)
    for name in (BUS_NAME, OLD_BUS_NAME):
        try:
            reply = await asyncio.wait_for(bus.request_name(name, NameFlag.DO_NOT_QUEUE),
                                           timeout)
        except Exception as err:
            log.error("D-Bus disabled: cannot have the bus name %s: %s", name, err)
            service.close()
            return None
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            log.error("D-Bus disabled: the bus name %s is taken (is another Mandos server "
                      "running?)", name)
            service.close()
            return None
    service._publish()
    log.debug("D-Bus: %s and %s on %s", BUS_NAME, OLD_BUS_NAME, bus.unique_name)
    return service

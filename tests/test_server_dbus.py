"""The server's D-Bus control interface (SERVER.md §14), on a private system bus.

Each test starts its own ``dbus-daemon`` (type "system", permissive policy,
socket in a temporary folder), the service on it, and a dbus-fast
connection that plays the part of mandos-ctl or mandos-monitor.  The last
part runs the original Debian 1.8.16 ``mandos-ctl`` and ``mandos-monitor``
against the service.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import datetime
import fcntl
import functools
import json
import logging
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from dbus_fast import DBusError, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from e2e.original_server import (SERVER_USER, DevLog, PrivateSystemBus, free_port,
                                  make_world_temp, remove, system_bus_config)
from mandos.server import dbus_api
from mandos.server.client import Client
from mandos.server.clients_conf import ClientConfig
from mandos.server.registry import ClientRegistry

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "dbus" / "mandos.conf"

NAME = "se.recompile.Mandos"
OLD_NAME = "se.bsnet.fukt.Mandos"
CLIENT = "se.recompile.Mandos.Client"
ALIAS = "se.bsnet.fukt.Mandos.Client"
PROPS = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
FOUR_INTERFACES = {CLIENT, ALIAS, PROPS, INTROSPECTABLE}
PATH = "/clients/foo_bar_baz"
KEY_ID = "A1" * 32
FINGERPRINT = "F0" * 20
T0 = datetime.datetime(2024, 5, 1, 10, 0, 0)

READABLE = {"ApprovalDelay": "t", "ApprovalDuration": "t", "ApprovalPending": "b",
            "ApprovedByDefault": "b", "CheckerRunning": "b", "Checker": "s", "Created": "s",
            "Enabled": "b", "Expires": "s", "ExtendedTimeout": "t", "Fingerprint": "s",
            "Host": "s", "Interval": "t", "KeyID": "s", "LastApprovalRequest": "s",
            "LastCheckedOK": "s", "LastCheckerStatus": "n", "LastEnabled": "s", "Name": "s",
            "ObjectPath": "o", "Timeout": "t"}


# -- fixtures and helpers ---------------------------------------------------


@pytest.fixture
def bus_address():
    """A private system bus for this test only."""
    folder = Path(tempfile.mkdtemp(prefix="mandos-dbus-"))
    os.chmod(folder, 0o755)
    try:
        with PrivateSystemBus(folder) as bus:
            yield bus.address
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_async(function):
    """Run an ``async def`` test on a fresh event loop, within 30 seconds."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(function(*args, **kwargs), 30))
    return wrapper


class FakeCheckers:
    """A checker runner: each run waits until the test finishes it with a wait status."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running: list[asyncio.Future] = []

    async def __call__(self, command: str) -> int:
        future = asyncio.get_running_loop().create_future()
        self.started.append(command)
        self.running.append(future)
        return await future

    async def finish(self, wait_status: int = 0) -> None:
        """End the oldest run with ``wait_status`` (once its task has started)."""
        while not self.running:
            await asyncio.sleep(0)
        self.running.pop(0).set_result(wait_status)
        await asyncio.sleep(0.01)


class Clock:
    """A settable ``now`` for clients."""

    def __init__(self, moment: datetime.datetime = T0) -> None:
        self.moment = moment

    def __call__(self) -> datetime.datetime:
        return self.moment


def make_client(name: str = "foo.bar-baz", checkers=None, now=None, **settings) -> Client:
    config = ClientConfig(name=name, key_id=KEY_ID, fingerprint=FINGERPRINT,
                          secret=b"the secret", host="foo.example", checker_command="true")
    for key, value in settings.items():
        setattr(config, key, value)
    extra = {"now": now} if now is not None else {}
    return Client(config, checkers or FakeCheckers(), **extra)


class Watcher:
    """A bus connection that calls the Mandos server and collects its signals."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.signals: list[Message] = []
        self.bus: MessageBus | None = None
        self.server_name: str | None = None  # the server's unique connection name
        self._arrived = asyncio.Event()

    async def connect(self) -> None:
        self.bus = await MessageBus(bus_address=self.address).connect()
        self.bus.add_message_handler(self._on_message)
        await self.bus_call("AddMatch", "s", [f"type='signal',sender='{NAME}'"])
        self.server_name = (await self.bus_call("GetNameOwner", "s", [NAME]))[0]

    def _on_message(self, message: Message) -> None:
        if message.message_type is MessageType.SIGNAL and message.sender == self.server_name:
            self.signals.append(message)
            self._arrived.set()

    async def bus_call(self, member: str, signature: str = "", body=()) -> list:
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member=member, signature=signature,
            body=list(body)))
        if reply.message_type is MessageType.ERROR:
            raise DBusError(reply.error_name, str(reply.body))
        return reply.body

    async def call(self, path: str, interface: str | None, member: str,
                   signature: str = "", body=(), destination: str = NAME) -> list:
        """Call a method of the service; DBusError for an error reply."""
        reply = await self.bus.call(Message(destination=destination, path=path,
                                            interface=interface, member=member,
                                            signature=signature, body=list(body)))
        if reply.message_type is MessageType.ERROR:
            raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
        return reply.body

    async def get(self, name: str, path: str = PATH, interface: str = CLIENT) -> Variant:
        return (await self.call(path, PROPS, "Get", "ss", [interface, name]))[0]

    async def set(self, name: str, variant: Variant, path: str = PATH,
                  interface: str = CLIENT) -> None:
        await self.call(path, PROPS, "Set", "ssv", [interface, name, variant])

    async def get_all(self, interface: str = CLIENT, path: str = PATH) -> dict[str, Variant]:
        return (await self.call(path, PROPS, "GetAll", "s", [interface]))[0]

    async def sync(self) -> None:
        """Return once every signal the service sent so far has arrived here."""
        await self.call("/", "org.freedesktop.DBus.Peer", "Ping")

    async def wait_for_signal(self, member: str, timeout: float = 5) -> Message:
        """The first collected signal called ``member``, waiting for it if need be."""
        async def arrival() -> Message:
            while True:
                for message in self.signals:
                    if message.member == member:
                        return message
                self._arrived.clear()
                await self._arrived.wait()
        return await asyncio.wait_for(arrival(), timeout)

    def take(self) -> list[tuple]:
        """The collected signals as (path, interface, member, plain body); then forget them."""
        taken = [(m.path, m.interface, m.member, plain(m.body)) for m in self.signals]
        self.signals.clear()
        return taken


class Peer(Watcher):
    """The service with a registry of clients, and a Watcher of it."""

    def __init__(self, address: str, *clients: Client) -> None:
        super().__init__(address)
        self.registry = ClientRegistry()
        for client in clients:
            self.registry.add(client)
        self.service: dbus_api.DBusService | None = None

    async def __aenter__(self) -> "Peer":
        self.service = await dbus_api.start(self.registry, self.address)
        assert self.service is not None
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        self.bus.disconnect()
        self.service.close()
        for client in list(self.registry):
            client.stop()

    @property
    def client(self) -> Client:
        return self.registry.clients["foo.bar-baz"]


def plain(value):
    """Variants and containers as plain Python values, for comparisons."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def changed(name: str, value, path: str = PATH) -> list[tuple]:
    """The three signals that announce a property change, in the original's order."""
    return [(path, CLIENT, "PropertyChanged", [name, value]),
            (path, ALIAS, "PropertyChanged", [name, value]),
            (path, PROPS, "PropertiesChanged", [CLIENT, {name: value}, []])]


async def released(bus: MessageBus, name: str) -> bool:
    """Whether ``name`` is without owner on the bus (or becomes so within 2 seconds)."""
    for _ in range(200):
        reply = await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="NameHasOwner", signature="s",
            body=[name]))
        if reply.body == [False]:
            return True
        await asyncio.sleep(0.01)
    return False


# -- bus names ------------------------------------------------------------


@run_async
async def test_both_bus_names_are_taken(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        owner = (await peer.bus_call("GetNameOwner", "s", [NAME]))[0]
        assert owner == peer.service.bus.unique_name
        assert (await peer.bus_call("GetNameOwner", "s", [OLD_NAME]))[0] == owner


@pytest.mark.parametrize("taken", [NAME, OLD_NAME])
@run_async
async def test_a_taken_bus_name_turns_dbus_off(bus_address, caplog, taken):
    other = await MessageBus(bus_address=bus_address).connect()
    try:
        await other.request_name(taken)
        registry = ClientRegistry()
        registry.add(make_client())
        with caplog.at_level(logging.ERROR):
            assert await dbus_api.start(registry, bus_address) is None
        assert taken in caplog.text
        assert registry.observers == []
        assert registry.clients["foo.bar-baz"].observers == []
        # The name it did get is released again.
        free = NAME if taken == OLD_NAME else OLD_NAME
        assert await released(other, free)
    finally:
        other.disconnect()


@run_async
async def test_no_bus_turns_dbus_off(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        service = await dbus_api.start(ClientRegistry(), f"unix:path={tmp_path}/nothing")
    assert service is None
    assert "D-Bus disabled" in caplog.text


@run_async
async def test_close_releases_the_names_and_stops_observing(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        peer.service.close()
        assert await released(peer.bus, NAME) and await released(peer.bus, OLD_NAME)
        assert peer.registry.observers == []
        assert peer.client.observers == []
        peer.client.disable()  # nothing breaks


@run_async
async def test_aclose_sends_what_is_still_queued(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        for seconds in range(301, 801):
            peer.client.set_timeout(datetime.timedelta(seconds=seconds))
        await peer.service.aclose()
        await asyncio.sleep(0.2)
        timeouts = [body[1]["Timeout"] for path, interface, member, body in peer.take()
                    if member == "PropertiesChanged" and "Timeout" in body[1]]
        assert timeouts[-1] == 800000 and len(timeouts) == 500


@run_async
async def test_losing_the_bus_is_logged_and_harmless(caplog):
    folder = Path(tempfile.mkdtemp(prefix="mandos-dbus-"))
    try:
        with PrivateSystemBus(folder) as bus:
            registry = ClientRegistry()
            registry.add(make_client())
            service = await dbus_api.start(registry, bus.address)
            bus.process.terminate()
            bus.process.wait()
            with caplog.at_level(logging.ERROR):
                for _ in range(100):
                    await asyncio.sleep(0.01)
                    if "Lost the D-Bus connection" in caplog.text:
                        break
            assert "Lost the D-Bus connection" in caplog.text
            client = registry.clients["foo.bar-baz"]
            client.disable()  # announcing it fails quietly
            registry.remove("foo.bar-baz")
            service.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- objects --------------------------------------------------------------


@run_async
async def test_object_path_replaces_dots_and_dashes(bus_address):
    async with Peer(bus_address, make_client(), make_client("plain_name"),
                    make_client("a-b.c")) as peer:
        paths = (await peer.call("/", NAME, "GetAllClients"))[0]
        assert paths == [PATH, "/clients/plain_name", "/clients/a_b_c"]
        assert (await peer.get("ObjectPath")).value == PATH
        assert (await peer.get("Name", "/clients/a_b_c")).value == "a-b.c"


@run_async
async def test_unusable_or_colliding_object_paths_stay_off_the_bus(bus_address, caplog):
    with caplog.at_level(logging.ERROR):
        async with Peer(bus_address, make_client("a.b"), make_client("a-b"),
                        make_client("with space")) as peer:
            assert (await peer.call("/", NAME, "GetAllClients"))[0] == ["/clients/a_b"]
            assert (await peer.get("Name", "/clients/a_b")).value == "a.b"
            assert len(peer.registry) == 3  # the others still work, without D-Bus
    assert "a-b" in caplog.text and "with space" in caplog.text


@run_async
async def test_checker_command_may_name_the_object_path(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        assert peer.client.checker_attributes()["dbus_object_path"] == PATH


@run_async
async def test_get_managed_objects_lists_clients_with_four_interfaces(bus_address):
    async with Peer(bus_address, make_client(), make_client("other")) as peer:
        objects = (await peer.call("/", OBJECT_MANAGER, "GetManagedObjects"))[0]
        assert list(objects) == [PATH, "/clients/other"]  # not "/" itself
        interfaces = objects[PATH]
        assert set(interfaces) == FOUR_INTERFACES
        assert interfaces[PROPS] == {} and interfaces[INTROSPECTABLE] == {}
        assert plain(interfaces[CLIENT]) == plain(interfaces[ALIAS])
        assert plain(interfaces[CLIENT]) == plain(await peer.get_all())
        assert interfaces[CLIENT]["Name"].value == "foo.bar-baz"


@run_async
async def test_get_all_clients_with_properties(bus_address):
    async with Peer(bus_address, make_client(), make_client("other")) as peer:
        for interface in (NAME, OLD_NAME):
            result = (await peer.call("/", interface, "GetAllClientsWithProperties"))[0]
            assert list(result) == [PATH, "/clients/other"]
            assert plain(result[PATH]) == plain(await peer.get_all())


@run_async
async def test_server_object_has_no_properties_interface(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        with pytest.raises(DBusError) as error:
            await peer.call("/", PROPS, "GetAll", "s", [""])
        assert error.value.type == "org.freedesktop.DBus.Error.UnknownMethod"
        with pytest.raises(DBusError):
            await peer.call(PATH, OBJECT_MANAGER, "GetManagedObjects")


@run_async
async def test_added_client_is_announced_without_change_signals(bus_address):
    async with Peer(bus_address) as peer:
        client = make_client()
        client.enable()  # already enabled: changes nothing
        client.set_timeout(datetime.timedelta(minutes=7))  # before it is on the bus
        peer.registry.add(client)
        await peer.sync()
        signals = peer.take()
        assert [signal[:3] for signal in signals] == [
            ("/", OBJECT_MANAGER, "InterfacesAdded"),
            ("/", NAME, "ClientAdded"), ("/", OLD_NAME, "ClientAdded")]
        path, interfaces = signals[0][3]
        assert path == PATH and set(interfaces) == FOUR_INTERFACES
        assert interfaces[CLIENT]["Timeout"] == 420000
        assert interfaces[ALIAS] == interfaces[CLIENT]
        assert signals[1][3] == [PATH] and signals[2][3] == [PATH]
        client.set_timeout(datetime.timedelta(minutes=8))  # now it is announced
        await peer.sync()
        assert changed("Timeout", 480000) == peer.take()[:3]


@run_async
async def test_remove_client_removes_it_quietly(bus_address):
    async with Peer(bus_address, make_client(), make_client("other")) as peer:
        client = peer.client
        await peer.call("/", NAME, "RemoveClient", "o", [PATH])
        await peer.sync()
        assert peer.take() == [
            ("/", OBJECT_MANAGER, "InterfacesRemoved", [PATH, [CLIENT, ALIAS, PROPS,
                                                               INTROSPECTABLE]]),
            ("/", NAME, "ClientRemoved", [PATH, "foo.bar-baz"]),
            ("/", OLD_NAME, "ClientRemoved", [PATH, "foo.bar-baz"])]
        assert "foo.bar-baz" not in peer.registry.clients
        assert not client.enabled and client.observers == []
        assert (await peer.call("/", NAME, "GetAllClients"))[0] == ["/clients/other"]
        with pytest.raises(DBusError) as error:
            await peer.get("Name")
        assert error.value.type == "org.freedesktop.DBus.Error.UnknownMethod"
        await peer.call("/", OLD_NAME, "RemoveClient", "o", ["/clients/other"])
        assert len(peer.registry) == 0


@run_async
async def test_remove_client_of_unknown_path_is_a_key_error(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        with pytest.raises(DBusError) as error:
            await peer.call("/", NAME, "RemoveClient", "o", ["/clients/nobody"])
        assert error.value.type == "org.freedesktop.DBus.Python.KeyError"
        assert len(peer.registry) == 1


@run_async
async def test_removal_by_the_server_is_announced(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        peer.registry.remove("foo.bar-baz")
        await peer.sync()
        members = [signal[2] for signal in peer.take()]
        assert members[-3:] == ["InterfacesRemoved", "ClientRemoved", "ClientRemoved"]


@run_async
async def test_client_not_found_is_signalled_twice(bus_address):
    async with Peer(bus_address) as peer:
        peer.registry.not_found("AB" * 32, "::1")
        await peer.sync()
        assert peer.take() == [("/", NAME, "ClientNotFound", ["AB" * 32, "::1"]),
                               ("/", OLD_NAME, "ClientNotFound", ["AB" * 32, "::1"])]


# -- properties -------------------------------------------------------------


@run_async
async def test_properties_have_their_types_and_units(bus_address):
    client = make_client(timeout=datetime.timedelta(minutes=5),
                         extended_timeout=datetime.timedelta(minutes=15, milliseconds=7),
                         interval=datetime.timedelta(seconds=90),
                         approval_delay=datetime.timedelta(seconds=3),
                         approval_duration=datetime.timedelta(milliseconds=1500),
                         approved_by_default=False, checker_command="fping -q -- %(host)s")
    async with Peer(bus_address, client) as peer:
        for interface in (CLIENT, ALIAS):
            values = await peer.get_all(interface)
            assert {name: variant.signature for name, variant in values.items()} == READABLE
            assert plain(values) | {"Created": "", "LastEnabled": "", "Expires": ""} == {
                "ApprovalDelay": 3000, "ApprovalDuration": 1500, "ApprovalPending": False,
                "ApprovedByDefault": False, "CheckerRunning": False,
                "Checker": "fping -q -- %(host)s", "Created": "", "Enabled": True,
                "Expires": "", "ExtendedTimeout": 900007, "Fingerprint": FINGERPRINT,
                "Host": "foo.example", "Interval": 90000, "KeyID": KEY_ID,
                "LastApprovalRequest": "", "LastCheckedOK": "", "LastCheckerStatus": -2,
                "LastEnabled": "", "Name": "foo.bar-baz", "ObjectPath": PATH,
                "Timeout": 300000}
            for name, variant in values.items():
                assert plain(await peer.get(name, interface=interface)) == variant.value


@run_async
async def test_timestamps_are_iso_without_zone_and_without_zero_microseconds(bus_address):
    clock = Clock(T0)
    async with Peer(bus_address, make_client(now=clock)) as peer:
        assert (await peer.get("Created")).value == "2024-05-01T10:00:00"
        assert (await peer.get("LastEnabled")).value == "2024-05-01T10:00:00"
        assert (await peer.get("Expires")).value == "2024-05-01T10:05:00"
        assert (await peer.get("LastCheckedOK")).value == ""
        assert (await peer.get("LastApprovalRequest")).value == ""
        clock.moment = datetime.datetime(2024, 5, 1, 10, 1, 2, 30)
        await peer.call(PATH, CLIENT, "CheckedOK")
        assert (await peer.get("LastCheckedOK")).value == "2024-05-01T10:01:02.000030"
        assert (await peer.get("Expires")).value == "2024-05-01T10:06:02.000030"
        await peer.call(PATH, CLIENT, "Disable")
        assert (await peer.get("Expires")).value == ""


@run_async
async def test_reading_write_only_secret_is_an_access_error(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        with pytest.raises(DBusError) as error:
            await peer.get("Secret")
        assert error.value.type == "org.freedesktop.DBus.Python.DBusPropertyAccessException"
        assert "Secret" not in await peer.get_all()


@pytest.mark.parametrize("interface, name", [(CLIENT, "Bogus"), ("", "Name"),
                                             ("org.example.Other", "Name")])
@run_async
async def test_unknown_property_is_not_found(bus_address, interface, name):
    async with Peer(bus_address, make_client()) as peer:
        for access in (peer.get(name, interface=interface),
                       peer.set(name, Variant("s", "x"), interface=interface)):
            with pytest.raises(DBusError) as error:
                await access
            assert error.value.type == "org.freedesktop.DBus.Python.DBusPropertyNotFound"


@pytest.mark.parametrize("name, variant", [
    ("Name", Variant("s", "x")), ("KeyID", Variant("s", "x")), ("Created", Variant("s", "")),
    ("ApprovalPending", Variant("b", True)), ("ObjectPath", Variant("o", "/x")),
    ("LastCheckerStatus", Variant("n", 0)), ("Expires", Variant("s", ""))])
@run_async
async def test_writing_read_only_property_is_an_access_error(bus_address, name, variant):
    async with Peer(bus_address, make_client()) as peer:
        with pytest.raises(DBusError) as error:
            await peer.set(name, variant)
        assert error.value.type == "org.freedesktop.DBus.Python.DBusPropertyAccessException"


@pytest.mark.parametrize("name, variant", [
    ("Timeout", Variant("s", "PT5M")), ("Timeout", Variant("i", -5)),
    ("Host", Variant("u", 5)), ("Secret", Variant("s", "text")),
    ("Enabled", Variant("s", "yes")), ("Interval", Variant("t", 2 ** 63))])
@run_async
async def test_writing_a_value_of_the_wrong_type_is_invalid_args(bus_address, name, variant):
    async with Peer(bus_address, make_client()) as peer:
        with pytest.raises(DBusError) as error:
            await peer.set(name, variant)
        assert error.value.type == "org.freedesktop.DBus.Error.InvalidArgs"


@run_async
async def test_get_all_of_empty_interface_gives_all_and_of_others_none(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        assert plain(await peer.get_all("")) == plain(await peer.get_all(CLIENT))
        assert await peer.get_all(PROPS) == {}
        assert await peer.get_all("org.example.Other") == {}


@pytest.mark.parametrize("interface", [CLIENT, ALIAS])
@run_async
async def test_writing_stored_properties(bus_address, interface):
    async with Peer(bus_address, make_client()) as peer:
        client = peer.client
        writes = [("ApprovalDelay", Variant("t", 2500)),
                  ("ApprovalDuration", Variant("i", 750)),  # dbus-python sends ints as "i"
                  ("ExtendedTimeout", Variant("u", 60000)),
                  ("ApprovedByDefault", Variant("b", False)),
                  ("Host", Variant("s", "new.example")),
                  ("Checker", Variant("s", "ping -c1 %%(host)s"))]
        for name, variant in writes:
            await peer.set(name, variant, interface=interface)
        assert client.approval_delay == datetime.timedelta(milliseconds=2500)
        assert client.approval_duration == datetime.timedelta(milliseconds=750)
        assert client.extended_timeout == datetime.timedelta(minutes=1)
        assert client.approved_by_default is False
        assert client.host == "new.example"
        assert client.checker_command == "ping -c1 %%(host)s"
        for name, variant in writes:
            assert (await peer.get(name, interface=interface)).value == variant.value


@run_async
async def test_writing_enabled_enables_and_disables(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        await peer.set("Enabled", Variant("b", False))
        assert not peer.client.enabled and peer.client.expires is None
        await peer.set("Enabled", Variant("b", True))
        assert peer.client.enabled and peer.client.expires is not None


@run_async
async def test_writing_checker_running_starts_and_stops_a_checker(bus_address):
    checkers = FakeCheckers()
    async with Peer(bus_address, make_client(checkers=checkers)) as peer:
        await peer.set("CheckerRunning", Variant("b", True))
        assert checkers.started == ["true"] and peer.client.checker_running
        assert (await peer.get("CheckerRunning")).value is True
        await peer.set("CheckerRunning", Variant("b", False))
        assert not peer.client.checker_running
        await asyncio.sleep(0)
        assert checkers.running[0].cancelled()


@pytest.mark.parametrize("variant", [Variant("s", ""), Variant("s", "2001-01-01T00:00:00"),
                                     Variant("b", False)])
@run_async
async def test_writing_last_checked_ok_means_checked_ok(bus_address, variant):
    clock = Clock(T0)
    async with Peer(bus_address, make_client(now=clock)) as peer:
        clock.moment = T0 + datetime.timedelta(minutes=1)
        await peer.set("LastCheckedOK", variant)
        assert peer.client.last_checked_ok == clock.moment
        assert peer.client.last_checker_status == 0
        assert peer.client.expires == clock.moment + datetime.timedelta(minutes=5)


@run_async
async def test_writing_interval_starts_a_checker_and_reschedules(bus_address):
    checkers = FakeCheckers()
    async with Peer(bus_address, make_client(checkers=checkers, enabled=False)) as peer:
        await peer.set("Enabled", Variant("b", True))  # schedules checkers
        expires = peer.client.expires
        await peer.set("Interval", Variant("t", 60000))
        assert peer.client.interval == datetime.timedelta(minutes=1)
        assert checkers.started == ["true"]  # one now
        assert peer.client.expires == expires


@run_async
async def test_writing_timeout_moves_the_expiry(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        expires = peer.client.expires
        await peer.set("Timeout", Variant("t", 360000))
        assert peer.client.timeout == datetime.timedelta(minutes=6)
        assert peer.client.expires == expires + datetime.timedelta(minutes=1)
        await peer.set("Timeout", Variant("t", 0))  # expiry now in the past
        assert not peer.client.enabled


@pytest.mark.parametrize("prop, attribute", [
    ("Timeout", "timeout"), ("Interval", "interval"), ("ExtendedTimeout", "extended_timeout"),
    ("ApprovalDelay", "approval_delay"), ("ApprovalDuration", "approval_duration")])
@run_async
async def test_writing_a_duration_beyond_1000_years_is_refused_and_changes_nothing(
        bus_address, prop, attribute):
    """A timeout so long that the expiry cannot be computed used to be
    stored before the error; now nothing changes."""
    async with Peer(bus_address, make_client()) as peer:
        before = getattr(peer.client, attribute)
        expires = peer.client.expires
        with pytest.raises(DBusError, match="longer than 1000 years") as error:
            await peer.set(prop, Variant("t", 3_000_000 * 86_400_000))
        assert error.value.type == "org.freedesktop.DBus.Error.InvalidArgs"
        assert getattr(peer.client, attribute) == before
        assert peer.client.expires == expires
        assert peer.client.enabled


@run_async
async def test_writing_secret_stores_raw_bytes(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        await peer.set("Secret", Variant("ay", b"\x00new\xffsecret"))
        assert peer.client.secret == b"\x00new\xffsecret"


# -- methods ----------------------------------------------------------------


@pytest.mark.parametrize("interface", [CLIENT, ALIAS])
@run_async
async def test_client_methods(bus_address, interface):
    checkers = FakeCheckers()
    clock = Clock(T0)
    async with Peer(bus_address, make_client(checkers=checkers, now=clock)) as peer:
        client = peer.client
        await peer.call(PATH, interface, "Disable")
        assert not client.enabled
        await peer.call(PATH, interface, "Enable")
        assert client.enabled
        await peer.call(PATH, interface, "StartChecker")
        assert checkers.started == ["true"] and client.checker_running
        await peer.call(PATH, interface, "StopChecker")
        assert not client.checker_running
        clock.moment = T0 + datetime.timedelta(seconds=5)
        await peer.call(PATH, interface, "CheckedOK")
        assert client.last_checked_ok == clock.moment
        await peer.call(PATH, interface, "Approve", "b", [True])
        assert client.approved is True
        await peer.call(PATH, interface, "Approve", "b", [False])
        assert client.approved is False


@run_async
async def test_unknown_method_is_an_error(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        for path, interface, member, signature, body in [
                (PATH, CLIENT, "Reboot", "", []), (PATH, CLIENT, "Approve", "s", ["x"]),
                ("/", NAME, "Nothing", "", []), ("/nowhere", CLIENT, "Enable", "", [])]:
            with pytest.raises(DBusError) as error:
                await peer.call(path, interface, member, signature, body)
            assert error.value.type == "org.freedesktop.DBus.Error.UnknownMethod"


@run_async
async def test_call_without_reply_is_carried_out(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        await peer.bus.send(Message(destination=NAME, path=PATH, interface=PROPS,
                                    member="Set", signature="ssv",
                                    body=[CLIENT, "Enabled", Variant("b", False)],
                                    flags=MessageFlag.NO_REPLY_EXPECTED))
        await peer.sync()
        assert not peer.client.enabled


@run_async
async def test_approve_wakes_a_waiting_connection(bus_address):
    client = make_client(approval_delay=datetime.timedelta(seconds=20),
                         approved_by_default=False)
    async with Peer(bus_address, client) as peer:
        waiting = asyncio.create_task(client.may_have_secret())
        need = await peer.wait_for_signal("NeedApproval")
        assert need.interface == CLIENT and need.body == [20000, False]
        assert (await peer.get("ApprovalPending")).value is True
        assert (await peer.get("LastApprovalRequest")).value != ""
        await peer.call(PATH, CLIENT, "Approve", "b", [True])
        assert await asyncio.wait_for(waiting, 2) is True
        assert (await peer.get("ApprovalPending")).value is False


@run_async
async def test_deny_rejects_a_waiting_connection(bus_address):
    client = make_client(approval_delay=datetime.timedelta(seconds=20))
    async with Peer(bus_address, client) as peer:
        waiting = asyncio.create_task(client.may_have_secret())
        await peer.wait_for_signal("NeedApproval")
        await peer.call(PATH, ALIAS, "Approve", "b", [False])
        assert await asyncio.wait_for(waiting, 2) is False
        rejected = await peer.wait_for_signal("Rejected")
        assert rejected.body == ["Denied"]


# -- signals ----------------------------------------------------------------


def events(signals: list[tuple]) -> list[tuple]:
    """The client event signals (no property changes) as (interface, member, body)."""
    return [(interface, member, body) for path, interface, member, body in signals
            if member not in ("PropertyChanged", "PropertiesChanged")]


@run_async
async def test_client_events_are_signalled_on_interface_then_alias(bus_address):
    checkers = FakeCheckers()
    client = make_client(checkers=checkers, approval_delay=datetime.timedelta(seconds=5))
    async with Peer(bus_address, client) as peer:
        client.start_checker()
        await checkers.finish(0)
        client.start_checker()
        await checkers.finish(1 << 8)  # exit status 1
        client.start_checker()
        await checkers.finish(9)  # killed by SIGKILL
        client.secret_sent()
        waiting = asyncio.create_task(client.may_have_secret())
        await asyncio.sleep(0.01)
        client.approve(False)
        await waiting
        await peer.sync()
        expected = []
        for member, body in [("CheckerStarted", ["true"]), ("CheckerCompleted", [0, 0, "true"]),
                             ("CheckerStarted", ["true"]),
                             ("CheckerCompleted", [1, 256, "true"]),
                             ("CheckerStarted", ["true"]),
                             ("CheckerCompleted", [-1, -256 + 9, "true"]),
                             ("GotSecret", []), ("NeedApproval", [5000, True]),
                             ("Rejected", ["Denied"])]:
            expected += [(CLIENT, member, body), (ALIAS, member, body)]
        assert events(peer.take()) == expected


@pytest.mark.parametrize("interface", [CLIENT, ALIAS])
@run_async
async def test_property_change_is_announced_three_times(bus_address, interface):
    async with Peer(bus_address, make_client()) as peer:
        await peer.set("Host", Variant("s", "new.example"), interface=interface)
        await peer.sync()
        assert peer.take() == changed("Host", "new.example")


@run_async
async def test_unchanged_writes_are_not_announced(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        await peer.set("Host", Variant("s", "foo.example"))
        await peer.set("Enabled", Variant("b", True))
        await peer.set("Timeout", Variant("t", 300000))
        await peer.set("ApprovalDuration", Variant("t", 1000))
        await peer.set("Secret", Variant("ay", b"the secret"))
        await peer.set("CheckerRunning", Variant("b", False))
        await peer.sync()
        assert peer.take() == []


@run_async
async def test_secret_change_only_invalidates_it(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        await peer.set("Secret", Variant("ay", b"another"))
        await peer.sync()
        assert peer.take() == [(PATH, PROPS, "PropertiesChanged", [CLIENT, {}, ["Secret"]])]


@run_async
async def test_changes_made_by_the_server_are_announced(bus_address):
    clock = Clock(T0)
    async with Peer(bus_address, make_client(now=clock, enabled=False)) as peer:
        clock.moment = T0 + datetime.timedelta(seconds=1)
        peer.client.enable()
        await peer.sync()
        assert peer.take() == (changed("Enabled", True)
                               + changed("LastEnabled", "2024-05-01T10:00:01")
                               + changed("Expires", "2024-05-01T10:04:01"))
        peer.client.disable()
        await peer.sync()
        assert peer.take() == changed("Expires", "") + changed("Enabled", False)


@run_async
async def test_approval_pending_is_announced_when_the_boolean_changes(bus_address):
    client = make_client(approval_delay=datetime.timedelta(seconds=20))
    async with Peer(bus_address, client) as peer:
        first = asyncio.create_task(client.may_have_secret())
        second = asyncio.create_task(client.may_have_secret())
        await asyncio.sleep(0.01)
        assert client.approvals_pending == 2
        client.approve(True)
        assert await first and await second
        await peer.sync()
        pending = [body for path, interface, member, body in peer.take()
                   if member == "PropertiesChanged" and "ApprovalPending" in body[1]]
        assert pending == [[CLIENT, {"ApprovalPending": True}, []],
                           [CLIENT, {"ApprovalPending": False}, []]]


@run_async
async def test_checker_running_is_announced(bus_address):
    checkers = FakeCheckers()
    async with Peer(bus_address, make_client(checkers=checkers)) as peer:
        peer.client.start_checker()
        await checkers.finish(1 << 8)
        await asyncio.sleep(0.01)
        await peer.sync()
        running = [body[1]["CheckerRunning"] for path, interface, member, body in peer.take()
                   if member == "PropertiesChanged" and "CheckerRunning" in body[1]]
        assert running == [True, False]


@run_async
async def test_many_signals_arrive_in_order(bus_address):
    """More than a socket buffer's worth of signals: none lost, none reordered."""
    async with Peer(bus_address, make_client()) as peer:
        count = 1500
        for seconds in range(301, 301 + count):
            peer.client.set_timeout(datetime.timedelta(seconds=seconds))
        await asyncio.wait_for(peer.sync(), 20)
        timeouts = [body[1]["Timeout"] for path, interface, member, body in peer.take()
                    if member == "PropertiesChanged" and "Timeout" in body[1]]
        assert timeouts == [seconds * 1000 for seconds in range(301, 301 + count)]
        assert peer.service.bus.connected


# -- introspection ----------------------------------------------------------


def introspect(xml_text: str) -> ET.Element:
    return ET.fromstring(xml_text.split("\n", 2)[2])  # after the DOCTYPE


def annotations(element: ET.Element) -> dict[str, str]:
    return {item.get("name"): item.get("value") for item in element.findall("annotation")}


@run_async
async def test_client_introspection_carries_annotations(bus_address):
    async with Peer(bus_address, make_client()) as peer:
        node = introspect((await peer.call(PATH, INTROSPECTABLE, "Introspect"))[0])
        interfaces = {item.get("name"): item for item in node.findall("interface")}
        assert set(interfaces) == FOUR_INTERFACES
        assert annotations(interfaces[ALIAS]) == {"org.freedesktop.DBus.Deprecated": "true"}
        assert annotations(interfaces[CLIENT]) == {}
        for name in (CLIENT, ALIAS):
            interface = interfaces[name]
            methods = {m.get("name"): m for m in interface.findall("method")}
            assert set(methods) == {"Approve", "CheckedOK", "Enable", "Disable",
                                    "StartChecker", "StopChecker"}
            for method in ("Enable", "Disable", "StartChecker", "StopChecker"):
                assert annotations(methods[method]) == {
                    "org.freedesktop.DBus.Deprecated": "true"}
            assert annotations(methods["Approve"]) == {}
            assert [(a.get("type"), a.get("direction")) for a in methods["Approve"]] == [
                ("b", "in")]
            signals = {s.get("name"): "".join(a.get("type") for a in s.findall("arg"))
                       for s in interface.findall("signal")}
            assert signals == {"CheckerCompleted": "nxs", "CheckerStarted": "s",
                               "GotSecret": "", "NeedApproval": "tb", "Rejected": "s",
                               "PropertyChanged": "sv"}
            properties = {p.get("name"): p for p in interface.findall("property")}
            assert {n: p.get("type") for n, p in properties.items()} == READABLE | {
                "Secret": "ay"}
            access = {n: p.get("access") for n, p in properties.items()}
            assert access["Secret"] == "write"
            assert {n for n, a in access.items() if a == "read"} == {
                "ApprovalPending", "Created", "Expires", "Fingerprint", "KeyID",
                "LastApprovalRequest", "LastCheckerStatus", "LastEnabled", "Name",
                "ObjectPath"}
            emits = {n: annotations(p).get("org.freedesktop.DBus.Property.EmitsChangedSignal")
                     for n, p in properties.items()}
            assert {n: e for n, e in emits.items() if e} == {
                "Name": "const", "KeyID": "const", "Fingerprint": "const",
                "Created": "const", "ObjectPath": "const", "Secret": "invalidates"}
            assert annotations(properties["ObjectPath"])[
                "org.freedesktop.DBus.Deprecated"] == "true"
            property_changed = interface.find("signal[@name='PropertyChanged']")
            assert annotations(property_changed) == {"org.freedesktop.DBus.Deprecated": "true"}


@run_async
async def test_root_and_clients_introspection(bus_address):
    async with Peer(bus_address, make_client(), make_client("other")) as peer:
        root = introspect((await peer.call("/", INTROSPECTABLE, "Introspect"))[0])
        interfaces = {item.get("name"): item for item in root.findall("interface")}
        assert set(interfaces) == {INTROSPECTABLE, OBJECT_MANAGER, NAME, OLD_NAME}
        assert [n.get("name") for n in root.findall("node")] == ["clients"]
        assert annotations(interfaces[OLD_NAME]) == {"org.freedesktop.DBus.Deprecated": "true"}
        deprecated = {"org.freedesktop.DBus.Deprecated": "true"}
        for name in (NAME, OLD_NAME):
            members = {m.get("name"): annotations(m) for m in interfaces[name]
                       if m.tag in ("method", "signal")}
            assert members == {"GetAllClients": deprecated,
                               "GetAllClientsWithProperties": deprecated, "RemoveClient": {},
                               "ClientAdded": {}, "ClientNotFound": {},
                               "ClientRemoved": deprecated}
        clients = introspect((await peer.call("/clients", INTROSPECTABLE, "Introspect"))[0])
        assert [n.get("name") for n in clients.findall("node")] == ["foo_bar_baz", "other"]
        assert clients.findall("interface") == []


# -- the bus policy file ----------------------------------------------------


def test_policy_lets_root_own_and_talk_but_nobody_else(tmp_path):
    """dbus/mandos.conf inside a bus with Debian's default system policy."""
    folder = Path(tempfile.mkdtemp(prefix="mandos-policy-"))
    os.chmod(folder, 0o755)
    address = f"unix:path={folder}/socket"
    config = folder / "bus.conf"
    config.write_text(system_bus_config(address, """\
        <deny own="*"/>
        <deny send_type="method_call"/>
        <allow send_type="signal"/>
        <allow send_requested_reply="true" send_type="method_return"/>
        <allow send_requested_reply="true" send_type="error"/>
        <allow receive_type="method_call"/>
        <allow receive_type="method_return"/>
        <allow receive_type="error"/>
        <allow receive_type="signal"/>
        <allow send_destination="org.freedesktop.DBus"
               send_interface="org.freedesktop.DBus"/>
        """, f"<include>{POLICY}</include>\n"))
    daemon = subprocess.Popen(["dbus-daemon", "--nofork", "--nopidfile",
                               f"--config-file={config}", "--print-address"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = daemon.stdout.readline()
        assert line, daemon.stderr.read().decode()
        os.chmod(folder / "socket", 0o777)
        probe = textwrap.dedent(f"""\
            import asyncio
            from dbus_fast import Message, MessageType, NameFlag
            from dbus_fast.aio import MessageBus
            async def main():
                bus = await MessageBus(bus_address={address!r}).connect()
                results = []
                for name in ({NAME!r}, {OLD_NAME!r}):
                    try:
                        results.append(str(await bus.request_name(name, NameFlag.DO_NOT_QUEUE)))
                    except Exception as err:
                        results.append(type(err).__name__ + ":" + str(getattr(err, "type", "")))
                print(" ".join(results), flush=True)
                if bus.unique_name and "PRIMARY" in results[0]:
                    await asyncio.sleep(1.5)  # stay the owner while the other probe calls
                else:
                    reply = await bus.call(Message(destination={NAME!r}, path="/",
                        interface="org.freedesktop.DBus.Peer", member="Ping"))
                    print(reply.error_name if reply.message_type == MessageType.ERROR
                          else "sent", flush=True)
            asyncio.run(main())
            """)
        root = subprocess.Popen(["/usr/bin/python3", "-c", probe], stdout=subprocess.PIPE,
                                text=True)
        assert root.stdout.readline().split() == ["RequestNameReply.PRIMARY_OWNER"] * 2
        nobody = subprocess.run(["/usr/bin/python3", "-c", probe], user=65534, group=65534,
                                capture_output=True, text=True, timeout=20)
        assert nobody.stdout.split() == [
            "DBusError:org.freedesktop.DBus.Error.AccessDenied"] * 2 + [
            "org.freedesktop.DBus.Error.AccessDenied"], nobody.stderr
        root.wait(timeout=20)
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


# -- side by side with the original server -----------------------------------


@pytest.fixture
def original_server_bus(debian_peers):
    """The original server (1.8.16) with D-Bus on, alone on a private system bus."""
    folder = make_world_temp("mandos-dbus-original-")
    config, state, tmp = folder / "config", folder / "state", folder / "tmp"
    for path in (config, state, tmp):
        path.mkdir()
    os.chown(state, SERVER_USER, SERVER_USER)
    os.chmod(tmp, 0o1777)
    secret = base64.b64encode(b"the secret").decode()
    sections = "".join(textwrap.dedent(f"""\
        [{name}]
        key_id = {key_id}
        fingerprint = {FINGERPRINT}
        secret = {secret}
        host = foo.example
        """) for name, key_id in (("foo.bar-baz", KEY_ID), ("other", "B2" * 32)))
    # A week's interval: no checker starts while the test runs.
    (config / "clients.conf").write_text(
        "[DEFAULT]\nchecker = true\ninterval = P1W\n\n" + sections)
    (config / "mandos.conf").write_text("[DEFAULT]\n")
    log_file = open(folder / "server.log", "wb")
    process = None
    try:
        with DevLog(), PrivateSystemBus(folder) as bus:
            env = dict(os.environ, TMPDIR=str(tmp), DBUS_SYSTEM_BUS_ADDRESS=bus.address)
            process = subprocess.Popen(
                ["/usr/bin/python3", str(debian_peers / "usr/sbin/mandos"), "--foreground",
                 "--debug", "--no-zeroconf", "--port", str(free_port()),
                 "--configdir", str(config), "--statedir", str(state)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
            for _ in range(200):
                if subprocess.run(["dbus-send", "--system", "--print-reply", f"--dest={NAME}",
                                   "/", "org.freedesktop.DBus.Peer.Ping"], env=env,
                                  capture_output=True).returncode == 0:
                    break
                assert process.poll() is None, (folder / "server.log").read_text()
                time.sleep(0.1)
            yield bus.address
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log_file.close()
        remove(folder)


def interface_shape(xml_text: str) -> tuple[set, list]:
    """Every interface, member, argument and annotation of an introspection, and the nodes."""
    node = ET.fromstring(xml_text[xml_text.index("<node"):])
    shape = set()
    for interface in node.findall("interface"):
        name = interface.get("name")
        shape.add((name, tuple(sorted(annotations(interface).items()))))
        for member in interface:
            if member.tag != "annotation":
                shape.add((name, member.tag, member.get("name"), member.get("type"),
                           member.get("access"),
                           tuple((arg.get("type"), arg.get("direction"), arg.get("name"))
                                 for arg in member.findall("arg")),
                           tuple(sorted(annotations(member).items()))))
    return shape, sorted(child.get("name") for child in node.findall("node"))


async def observed_behaviour(watcher: Watcher) -> dict:
    """What a client of the bus sees of a Mandos server, without times and values."""
    seen: dict = {}
    for path in ("/", "/clients", PATH):
        seen[f"introspect {path}"] = interface_shape(
            (await watcher.call(path, INTROSPECTABLE, "Introspect"))[0])
    objects = (await watcher.call("/", OBJECT_MANAGER, "GetManagedObjects"))[0]
    seen["managed objects"] = {path: {interface: {name: value.signature
                                                  for name, value in values.items()}
                                      for interface, values in interfaces.items()}
                               for path, interfaces in objects.items()}
    seen["GetAll('')"] = sorted(await watcher.get_all(""))
    outcomes = []
    for call in [(PATH, PROPS, "Get", "ss", [CLIENT, "Secret"]),
                 (PATH, PROPS, "Get", "ss", [CLIENT, "Bogus"]),
                 (PATH, PROPS, "Get", "ss", ["", "Name"]),
                 (PATH, PROPS, "Get", "ss", [ALIAS, "Name"]),
                 (PATH, PROPS, "Set", "ssv", [CLIENT, "Name", Variant("s", "x")]),
                 (PATH, PROPS, "Set", "ssv", [CLIENT, "Bogus", Variant("s", "x")]),
                 (PATH, PROPS, "GetAll", "s", ["org.example.Other"]),
                 ("/", PROPS, "GetAll", "s", [""]),
                 ("/", NAME, "RemoveClient", "o", ["/clients/nobody"]),
                 (PATH, CLIENT, "Reboot", "", []),
                 (PATH, OBJECT_MANAGER, "GetManagedObjects", "", [])]:
        try:
            outcomes.append(plain(await watcher.call(*call)))
        except DBusError as error:
            outcomes.append(error.type)
    seen["outcomes"] = outcomes
    watcher.take()
    for action in [(PROPS, "Set", "ssv", [CLIENT, "Host", Variant("s", "new.example")]),
                   (PROPS, "Set", "ssv", [ALIAS, "Host", Variant("s", "new.example")]),
                   (PROPS, "Set", "ssv", [CLIENT, "Secret", Variant("ay", b"new")]),
                   (PROPS, "Set", "ssv", [CLIENT, "Timeout", Variant("t", 600000)]),
                   (PROPS, "Set", "ssv", [CLIENT, "Enabled", Variant("b", False)]),
                   (CLIENT, "Approve", "b", [True])]:
        await watcher.call(PATH, *action)
        await watcher.call("/", "org.freedesktop.DBus.Peer", "Ping")
        seen[f"signals after {action[1]} {plain(action[3])}"] = [
            (path, interface, member, body[0] if member == "PropertyChanged" else
             (body[0], sorted(body[1]), body[2]) if member == "PropertiesChanged" else None)
            for path, interface, member, body in watcher.take()]
    await watcher.call("/", NAME, "RemoveClient", "o", ["/clients/other"])
    await watcher.call("/", "org.freedesktop.DBus.Peer", "Ping")
    seen["signals after RemoveClient"] = [
        (path, interface, member, sorted(body[1]) if member == "InterfacesRemoved" else body)
        for path, interface, member, body in watcher.take()]
    return seen


@pytest.mark.interop
@pytest.mark.slow
@run_async
async def test_bus_shows_what_the_original_server_shows(bus_address, original_server_bus):
    """Introspection, objects, errors and signals, side by side with the original."""
    original = Watcher(original_server_bus)
    await original.connect()
    try:
        expected = await observed_behaviour(original)
    finally:
        original.bus.disconnect()
    async with Peer(bus_address, make_client(), make_client("other", key_id="B2" * 32)) as peer:
        seen = await observed_behaviour(peer)
    assert list(seen) == list(expected)
    for key in expected:
        assert seen[key] == expected[key], key


# -- the original mandos-ctl ------------------------------------------------


async def mandos_ctl(root: Path, address: str, *args: str) -> subprocess.CompletedProcess:
    """Run the original mandos-ctl against the service (the event loop keeps running)."""
    process = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", str(root / "usr/sbin/mandos-ctl"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, LC_ALL="C.UTF-8"))
    out, err = await asyncio.wait_for(process.communicate(), 20)
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


def ctl_clients(checkers=None):
    clock = Clock(T0)
    first = make_client(checkers=checkers, now=clock)
    second = make_client("db-server", now=Clock(datetime.datetime(2024, 5, 1, 10, 0, 0, 5)),
                         timeout=datetime.timedelta(days=1, hours=2, minutes=3, seconds=5),
                         enabled=False)
    return first, second, clock


@pytest.mark.interop
@run_async
async def test_mandos_ctl_lists_clients(bus_address, debian_peers):
    first, second, clock = ctl_clients()
    async with Peer(bus_address, first, second):
        clock.moment = datetime.datetime(2024, 5, 1, 10, 0, 0, 123456)
        first.checked_ok()
        result = await mandos_ctl(debian_peers, bus_address)
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            "Name        Enabled Timeout    Last Successful Check     \n"
            "foo.bar-baz Yes     00:05:00   2024-05-01T10:00:00.123456\n"
            "db-server   No      1T02:03:05                           \n")
        named = await mandos_ctl(debian_peers, bus_address, "db-server")
        assert named.stdout.splitlines()[1].startswith("db-server")
        assert len(named.stdout.splitlines()) == 2


@pytest.mark.interop
@run_async
async def test_mandos_ctl_verbose_table(bus_address, debian_peers):
    first, second, clock = ctl_clients()
    async with Peer(bus_address, first, second):
        result = await mandos_ctl(debian_peers, bus_address, "--verbose")
        assert result.returncode == 0, result.stderr
        header, row, other = result.stdout.splitlines()
        titles = ["Name", "Enabled", "Timeout", "Last Successful Check", "Created",
                  "Interval", "Host", "Key ID", "Fingerprint", "Check Is Running",
                  "Last Enabled", "Approval Is Pending", "Approved By Default",
                  "Last Approval Request", "Approval Delay", "Approval Duration", "Checker",
                  "Extended Timeout", "Expires", "Last Checker Status"]
        assert re.fullmatch(" +".join(re.escape(title) for title in titles) + " *", header)
        cells = row.split()
        assert cells[:7] == ["foo.bar-baz", "Yes", "00:05:00", "2024-05-01T10:00:00",
                             "00:02:00", "foo.example", KEY_ID]
        assert cells[-3:] == ["00:15:00", "2024-05-01T10:05:00", "-2"]
        assert "2024-05-01T10:00:00.000005" in other and "1T02:03:05" in other


@pytest.mark.interop
@run_async
async def test_mandos_ctl_dump_json(bus_address, debian_peers):
    first, second, clock = ctl_clients()
    async with Peer(bus_address, first, second) as peer:
        result = await mandos_ctl(debian_peers, bus_address, "--dump-json")
        assert result.returncode == 0, result.stderr
        dump = json.loads(result.stdout)
        assert list(dump) == ["foo.bar-baz", "db-server"]
        properties = plain(await peer.get_all())
        assert dump["foo.bar-baz"] == {key: properties[key] for key in dump["foo.bar-baz"]}
        assert len(dump["foo.bar-baz"]) == 20
        assert dump["db-server"]["Timeout"] == 93785000
        assert dump["db-server"]["Created"] == "2024-05-01T10:00:00.000005"
        assert dump["db-server"]["Expires"] == ""


def _check_approved(value):
    return lambda client, peer: client.approved is value


@pytest.mark.interop
@pytest.mark.parametrize("args, check", [
    (["--disable"], lambda c, p: not c.enabled),
    (["--bump-timeout"], lambda c, p: c.last_checked_ok is not None
        and c.last_checker_status == 0),
    (["--approve"], _check_approved(True)),
    (["--deny"], _check_approved(False)),
    (["--checker", "fping -q -- %(host)s"],
     lambda c, p: c.checker_command == "fping -q -- %(host)s"),
    (["--timeout", "PT10M"], lambda c, p: c.timeout == datetime.timedelta(minutes=10)),
    (["--interval", "PT30S"], lambda c, p: c.interval == datetime.timedelta(seconds=30)),
    (["--extended-timeout", "PT1H"],
     lambda c, p: c.extended_timeout == datetime.timedelta(hours=1)),
    (["--approval-delay", "PT7S"],
     lambda c, p: c.approval_delay == datetime.timedelta(seconds=7)),
    (["--approval-duration", "PT2S"],
     lambda c, p: c.approval_duration == datetime.timedelta(seconds=2)),
    (["--host", "other.example"], lambda c, p: c.host == "other.example"),
    (["--deny-by-default"], lambda c, p: c.approved_by_default is False),
    (["--start-checker"], lambda c, p: c.checker_running),
    (["--remove"], lambda c, p: "foo.bar-baz" not in p.registry.clients and not c.enabled),
], ids=lambda value: value[0] if isinstance(value, list) else "")
@run_async
async def test_mandos_ctl_actions(bus_address, debian_peers, args, check):
    checkers = FakeCheckers()
    first, second, clock = ctl_clients(checkers)
    async with Peer(bus_address, first, second) as peer:
        result = await mandos_ctl(debian_peers, bus_address, *args, "foo.bar-baz")
        assert result.returncode == 0, result.stderr
        assert check(first, peer)
        assert second.observers  # the other client is untouched and still shown


@pytest.mark.interop
@run_async
async def test_mandos_ctl_enable_secret_and_all(bus_address, debian_peers, tmp_path):
    first, second, clock = ctl_clients()
    async with Peer(bus_address, first, second):
        assert (await mandos_ctl(debian_peers, bus_address, "--is-enabled",
                                 "db-server")).returncode == 1
        result = await mandos_ctl(debian_peers, bus_address, "--enable", "db-server")
        assert result.returncode == 0, result.stderr
        assert second.enabled
        assert (await mandos_ctl(debian_peers, bus_address, "--is-enabled",
                                 "db-server")).returncode == 0
        secret = tmp_path / "secret"
        secret.write_bytes(b"\x00\x01binary\xff")
        result = await mandos_ctl(debian_peers, bus_address, "--secret", str(secret),
                                  "--all")
        assert result.returncode == 0, result.stderr
        assert first.secret == second.secret == b"\x00\x01binary\xff"
        result = await mandos_ctl(debian_peers, bus_address, "--disable", "nobody")
        assert result.returncode == 1
        assert "not found on server: 'nobody'" in result.stderr


@pytest.mark.interop
@run_async
async def test_mandos_ctl_without_server(bus_address, debian_peers):
    result = await mandos_ctl(debian_peers, bus_address)
    assert result.returncode == 1
    assert "Mandos server" in result.stderr


# -- the original mandos-monitor --------------------------------------------


class Screen:
    """Just enough of a terminal to read what mandos-monitor (urwid, TERM=xterm) shows."""

    _CONTROL = re.compile(r"\x1b\[([0-9;?]*)([@-~])|\x1b[()][0-9A-Za-z]|\x1b([=>78DEMc])")

    def __init__(self, rows: int, columns: int) -> None:
        self.rows, self.columns = rows, columns
        self.cells = [self._blank() for _ in range(rows)]
        self.row = self.column = 0
        self.top, self.bottom = 0, rows - 1  # the scrolling region
        self._pending = ""

    def _blank(self) -> list[str]:
        return [" "] * self.columns

    def feed(self, text: str) -> None:
        text = self._pending + text
        self._pending = ""
        position = 0
        while position < len(text):
            char = text[position]
            if char == "\x1b":
                match = self._CONTROL.match(text, position)
                if match is None:
                    if len(text) - position < 16:  # the rest comes later
                        self._pending = text[position:]
                        break
                    position += 1
                    continue
                if match.group(2):
                    self._csi(match.group(1), match.group(2))
                elif match.group(3):
                    self._escape(match.group(3))
                position = match.end()
                continue
            if char == "\r":
                self.column = 0
            elif char == "\n":
                self._down()
            elif char == "\b":
                self.column = max(self.column - 1, 0)
            elif char >= " " and self.column < self.columns:
                self.cells[self.row][self.column] = char
                self.column += 1
            position += 1

    def _down(self) -> None:
        if self.row == self.bottom:
            del self.cells[self.top]
            self.cells.insert(self.bottom, self._blank())
        else:
            self.row = min(self.row + 1, self.rows - 1)

    def _escape(self, final: str) -> None:
        if final == "D":
            self._down()
        elif final == "E":
            self._down()
            self.column = 0
        elif final == "M":  # reverse index: scroll the region down at its top
            if self.row == self.top:
                del self.cells[self.bottom]
                self.cells.insert(self.top, self._blank())
            else:
                self.row = max(self.row - 1, 0)

    def _csi(self, parameters: str, final: str) -> None:
        if parameters.startswith("?"):
            return  # modes
        numbers = [int(p) if p.isdigit() else 0 for p in parameters.split(";")]
        first = numbers[0] or 1
        second = (numbers[1] if len(numbers) > 1 else 0) or 1
        row = self.cells[self.row]
        if final in "Hf":
            self.row, self.column = min(first, self.rows) - 1, min(second, self.columns) - 1
        elif final == "d":
            self.row = min(first, self.rows) - 1
        elif final == "G":
            self.column = min(first, self.columns) - 1
        elif final == "A":
            self.row = max(self.row - first, 0)
        elif final == "B":
            self.row = min(self.row + first, self.rows - 1)
        elif final == "C":
            self.column = min(self.column + first, self.columns - 1)
        elif final == "D":
            self.column = max(self.column - first, 0)
        elif final == "K":
            if numbers[0] == 0:
                row[self.column:] = [" "] * (self.columns - self.column)
            elif numbers[0] == 1:
                row[:self.column + 1] = [" "] * (self.column + 1)
            else:
                row[:] = self._blank()
        elif final == "J" and numbers[0] == 2:
            self.cells = [self._blank() for _ in range(self.rows)]
        elif final == "X":
            end = min(self.column + first, self.columns)
            row[self.column:end] = [" "] * (end - self.column)
        elif final == "P":
            del row[self.column:self.column + first]
            row.extend([" "] * (self.columns - len(row)))
        elif final == "@":
            row[self.column:self.column] = [" "] * first
            del row[self.columns:]
        elif final in "LM" and self.top <= self.row <= self.bottom:
            for _ in range(first):
                if final == "L":
                    del self.cells[self.bottom]
                    self.cells.insert(self.row, self._blank())
                else:
                    del self.cells[self.row]
                    self.cells.insert(self.bottom, self._blank())
        elif final == "r":
            self.top = first - 1
            self.bottom = min((numbers[1] if len(numbers) > 1 and numbers[1] else self.rows),
                              self.rows) - 1
            self.row = self.column = 0

    def text(self) -> str:
        return "\n".join("".join(row).rstrip() for row in self.cells)

    async def wait_for(self, condition, timeout: float = 10) -> None:
        async def until() -> None:
            while not condition(self.text()):
                await asyncio.sleep(0.02)
        try:
            await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"mandos-monitor never showed it:\n{self.text()}") from None


@pytest.mark.interop
@run_async
async def test_mandos_monitor_follows_the_service(bus_address, debian_peers):
    checkers = FakeCheckers()
    first = make_client(checkers=checkers)
    second = make_client("db-server")
    async with Peer(bus_address, first, second) as peer:
        rows, columns = 30, 120
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        process = await asyncio.create_subprocess_exec(
            "/usr/bin/python3", str(debian_peers / "usr/sbin/mandos-monitor"),
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus_address, TERM="xterm",
                     LC_ALL="C.UTF-8"))
        os.close(slave)
        screen = Screen(rows, columns)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = os.read(master, 65536)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(master)
                return
            screen.feed(decoder.decode(data))

        loop.add_reader(master, readable)
        try:
            # No checker has run yet: LastCheckerStatus is -2, a "failed" checker.
            await screen.wait_for(lambda text: "foo.bar-baz: A checker has failed!" in text)
            first.checked_ok()  # PropertiesChanged: LastCheckerStatus 0
            await screen.wait_for(lambda text: "foo.bar-baz: enabled" in text)
            second.disable()
            await screen.wait_for(lambda text: "db-server: DISABLED" in text)
            peer.registry.add(make_client("new-one", enabled=False))  # InterfacesAdded
            await screen.wait_for(lambda text: "new-one: DISABLED" in text)
            peer.registry.remove("new-one")  # InterfacesRemoved
            await screen.wait_for(lambda text: "new-one:" not in text)
            # Keys act on the selected client, the first by name: db-server.
            os.write(master, b"+")
            await screen.wait_for(lambda text: "db-server: A checker has failed!" in text)
            assert second.enabled
            os.write(master, b"s")
            await screen.wait_for(lambda text: second.checker_running)
            os.write(master, b"a")
            await screen.wait_for(lambda text: second.approved is True)
            os.write(master, b"d")
            await screen.wait_for(lambda text: second.approved is False)
            os.write(master, b"C")
            await screen.wait_for(lambda text: second.last_checked_ok is not None)
            await screen.wait_for(lambda text: "db-server: enabled" in text)
            os.write(master, b"-")
            await screen.wait_for(lambda text: "db-server: DISABLED" in text)
            os.write(master, b"R")
            await screen.wait_for(lambda text: "db-server:" not in text)
            assert "db-server" not in peer.registry.clients
            os.write(master, b"q")
            await asyncio.wait_for(process.wait(), 10)
        finally:
            loop.remove_reader(master)
            if process.returncode is None:
                process.kill()
                await process.wait()
            os.close(master)

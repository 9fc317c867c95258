"""One client on D-Bus: the object ``/clients/NAME'`` (SERVER.md §14.4).

A :class:`ClientObject` translates between a :class:`~mandos.server.client.Client`
and the bus: it answers method calls and property access, and turns the
client's observer callbacks into signals.  It does not own the bus
connection; it hands every outgoing signal to an ``emit`` function given by
:mod:`mandos.server.dbus_api`.

Change notification follows the original server: when a property's value,
converted to its D-Bus form, differs from the value last announced, the
deprecated ``PropertyChanged(name, value)`` goes out on
``se.recompile.Mandos.Client`` and then on the alias
``se.bsnet.fukt.Mandos.Client``, followed by one standard
``org.freedesktop.DBus.Properties.PropertiesChanged`` naming
``se.recompile.Mandos.Client``.  ``PropertiesChanged`` is *not* repeated for
the alias interface name: the original does not send it, and mandos-monitor
ignores every ``PropertiesChanged`` whose interface is not
``se.recompile.Mandos.Client``.  ``Secret`` is only ever invalidated.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from dbus_fast import Variant

from mandos import timespec
from mandos.server.client import Client, ClientObserver
from mandos.server.dbus_objects import (
    DEPRECATED, EMITS_CHANGED, INTROSPECTABLE, INTROSPECTABLE_INTERFACE, INVALID_ARGS,
    PROPERTIES, PROPERTIES_INTERFACE, PROPERTY_ACCESS, PROPERTY_NOT_FOUND, Arg, CallError,
    Interface, Method, Property, Signal, introspection_xml, unknown_method)

log = logging.getLogger(__name__)

CLIENT_INTERFACE = "se.recompile.Mandos.Client"
CLIENT_ALIAS = "se.bsnet.fukt.Mandos.Client"
CLIENTS_PATH = "/clients"

_INTEGER_TYPES = frozenset("ynqiuxt")

Emit = Callable[[str, str, str, str, list], None]  # path, interface, member, signature, body


def object_path(name: str) -> str:
    """``/clients/NAME'``: the client name with every ``.`` and ``-`` made ``_``."""
    return f"{CLIENTS_PATH}/" + name.translate({ord("."): "_", ord("-"): "_"})


def dbus_time(moment: datetime.datetime | None) -> str:
    """A naive-UTC timestamp as the API shows it: ISO 8601, no zone, "" for none.

    ``isoformat`` leaves out ``.ffffff`` when the microseconds are zero, as
    the original does (SERVER.md §14.4).
    """
    return "" if moment is None else moment.isoformat()


def dbus_milliseconds(duration: datetime.timedelta) -> int:
    """A duration as the API's ``t``: whole milliseconds, never negative."""
    return max(timespec.milliseconds(duration), 0)


def _store(attribute: str) -> Callable[[Client, Any], None]:
    """A setter for a value the client just stores (SERVER.md §8.6 "store")."""
    def store(client: Client, value: Any) -> None:
        client.set_setting(attribute, value)
    return store


def _store_duration(attribute: str) -> Callable[[Client, int], None]:
    store = _store(attribute)
    return lambda client, value: store(client, timespec.from_milliseconds(value))


def _set_checker_running(client: Client, running: bool) -> None:
    if running:
        client.start_checker()
    else:
        client.stop_checker()


def _set_enabled(client: Client, enabled: bool) -> None:
    if enabled:
        client.enable()
    else:
        client.disable()


@dataclasses.dataclass(frozen=True)
class ClientProperty:
    """A property of a client object and where its value comes from and goes to.

    ``attribute`` is the :attr:`Client.OBSERVED` name whose change notices
    announce this property; ``emits`` is its EmitsChangedSignal annotation
    ("true", "const" or "invalidates"); with ``any_value`` a write accepts a
    value of any type (it is ignored).
    """

    name: str
    type: str
    access: str
    get: Callable[["ClientObject"], Any] | None = None
    set: Callable[[Client, Any], None] | None = None
    attribute: str | None = None
    emits: str = "true"
    deprecated: bool = False
    any_value: bool = False

    def describe(self) -> Property:
        """The introspection view of this property."""
        annotations: list[tuple[str, str]] = []
        if self.emits != "true":
            annotations.append((EMITS_CHANGED, self.emits))
        if self.deprecated:
            annotations.append((DEPRECATED, "true"))
        return Property(self.name, self.type, self.access, tuple(annotations))

    def coerce(self, variant: Variant) -> Any:
        """The written variant's value as this property takes it; InvalidArgs if unusable.

        Integers of any D-Bus type are taken for durations and booleans:
        dbus-python, which mandos-ctl uses, sends a Python ``int`` as ``i``.
        """
        signature, value = variant.signature, variant.value
        if self.any_value:
            return value
        if self.type == "t" and signature in _INTEGER_TYPES and value >= 0:
            return int(value)
        if self.type == "b" and (signature == "b" or signature in _INTEGER_TYPES):
            return bool(value)
        if self.type == signature == "s":
            return str(value)
        if self.type == signature == "ay":
            return bytes(value)
        raise CallError(INVALID_ARGS, f"property {self.name} takes a value of type "
                                      f"{self.type!r}, not {signature!r}")


def _duration(attribute: str, name: str, setter=None) -> ClientProperty:
    return ClientProperty(name, "t", "readwrite",
                          get=lambda obj: dbus_milliseconds(getattr(obj.client, attribute)),
                          set=setter or _store_duration(attribute), attribute=attribute)


def _timestamp(attribute: str, name: str, **extra) -> ClientProperty:
    return ClientProperty(name, "s", extra.pop("access", "read"),
                          get=lambda obj: dbus_time(getattr(obj.client, attribute)),
                          attribute=attribute, **extra)


def _constant(name: str, type_: str, get: Callable[["ClientObject"], Any],
              deprecated: bool = False) -> ClientProperty:
    return ClientProperty(name, type_, "read", get=get, emits="const", deprecated=deprecated)


# In the original's order (it lists them sorted by its method names).
CLIENT_PROPERTIES: tuple[ClientProperty, ...] = (
    _duration("approval_delay", "ApprovalDelay"),
    _duration("approval_duration", "ApprovalDuration"),
    ClientProperty("ApprovalPending", "b", "read",
                   get=lambda obj: obj.client.approvals_pending > 0,
                   attribute="approvals_pending"),
    ClientProperty("ApprovedByDefault", "b", "readwrite",
                   get=lambda obj: bool(obj.client.approved_by_default),
                   set=_store("approved_by_default"), attribute="approved_by_default"),
    ClientProperty("CheckerRunning", "b", "readwrite",
                   get=lambda obj: obj.client.checker_running, set=_set_checker_running,
                   attribute="checker_running"),
    ClientProperty("Checker", "s", "readwrite", get=lambda obj: obj.client.checker_command,
                   set=_store("checker_command"), attribute="checker_command"),
    _constant("Created", "s", lambda obj: dbus_time(obj.client.created)),
    ClientProperty("Enabled", "b", "readwrite", get=lambda obj: bool(obj.client.enabled),
                   set=_set_enabled, attribute="enabled"),
    _timestamp("expires", "Expires"),
    _duration("extended_timeout", "ExtendedTimeout"),
    _constant("Fingerprint", "s", lambda obj: obj.client.fingerprint),
    ClientProperty("Host", "s", "readwrite", get=lambda obj: obj.client.host,
                   set=_store("host"), attribute="host"),
    _duration("interval", "Interval",
              lambda client, value: client.set_interval(timespec.from_milliseconds(value))),
    _constant("KeyID", "s", lambda obj: obj.client.key_id),
    _timestamp("last_approval_request", "LastApprovalRequest"),
    # Writing anything here means "checked OK now"; mandos-ctl writes "".
    _timestamp("last_checked_ok", "LastCheckedOK", access="readwrite", any_value=True,
               set=lambda client, _value: client.checked_ok()),
    ClientProperty("LastCheckerStatus", "n", "read",
                   get=lambda obj: obj.client.last_checker_status,
                   attribute="last_checker_status"),
    _timestamp("last_enabled", "LastEnabled"),
    _constant("Name", "s", lambda obj: obj.client.name),
    _constant("ObjectPath", "o", lambda obj: obj.path, deprecated=True),
    ClientProperty("Secret", "ay", "write", set=lambda client, value: client.set_secret(value),
                   attribute="secret", emits="invalidates"),
    _duration("timeout", "Timeout",
              lambda client, value: client.set_timeout(timespec.from_milliseconds(value))),
)
PROPERTY_BY_NAME = {prop.name: prop for prop in CLIENT_PROPERTIES}
PROPERTY_BY_ATTRIBUTE = {prop.attribute: prop for prop in CLIENT_PROPERTIES if prop.attribute}

_DEPRECATED = ((DEPRECATED, "true"),)

# Method name -> what it does to the client.
_ACTIONS: dict[str, Callable[..., None]] = {
    "Approve": lambda client, approved: client.approve(bool(approved)),
    "CheckedOK": lambda client: client.checked_ok(),
    "Enable": lambda client: client.enable(),
    "StartChecker": lambda client: client.start_checker(),
    "Disable": lambda client: client.disable(),
    "StopChecker": lambda client: client.stop_checker(),
}

CLIENT_INTERFACE_DESCRIPTION = Interface(
    CLIENT_INTERFACE,
    methods=(
        Method("Approve", (Arg("b", "value", "in"),)),
        Method("CheckedOK"),
        Method("Enable", annotations=_DEPRECATED),
        Method("StartChecker", annotations=_DEPRECATED),
        Method("Disable", annotations=_DEPRECATED),
        Method("StopChecker", annotations=_DEPRECATED),
    ),
    signals=(
        Signal("CheckerCompleted", (Arg("n", "exitcode"), Arg("x", "waitstatus"),
                                    Arg("s", "command"))),
        Signal("CheckerStarted", (Arg("s", "command"),)),
        Signal("PropertyChanged", (Arg("s", "property"), Arg("v", "value")),
               annotations=_DEPRECATED),
        Signal("GotSecret"),
        Signal("Rejected", (Arg("s", "reason"),)),
        Signal("NeedApproval", (Arg("t", "timeout"), Arg("b", "default"))),
    ),
    properties=tuple(prop.describe() for prop in CLIENT_PROPERTIES),
)
CLIENT_ALIAS_DESCRIPTION = CLIENT_INTERFACE_DESCRIPTION.deprecated_alias(CLIENT_ALIAS)

# What GetManagedObjects, InterfacesAdded and InterfacesRemoved name for a client.
MANAGED_INTERFACES = (CLIENT_INTERFACE, CLIENT_ALIAS, PROPERTIES, INTROSPECTABLE)

_CONVERT = {"n": int, "x": int, "t": int, "b": bool, "s": str}


def _secret_digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class ClientObject(ClientObserver):
    """The D-Bus object of one client.

    Construct it, then :meth:`attach` it once the object is visible on the
    bus; nothing is announced before that, so no change signals go out
    while the object is being created.
    """

    def __init__(self, client: Client, path: str, emit: Emit) -> None:
        self.client = client
        self.path = path
        self._emit = emit
        self.attached = False
        # The D-Bus form of each announced value, as last announced.
        self._announced = {prop.name: prop.get(self) for prop in CLIENT_PROPERTIES
                           if prop.attribute and prop.get}
        self._secret = _secret_digest(client.secret)
        self._xml: str | None = None

    def __repr__(self) -> str:
        return f"<ClientObject {self.path}>"

    # -- life cycle -------------------------------------------------------

    def attach(self) -> None:
        """Start announcing the client's changes and events."""
        if self.attached:
            return
        self.attached = True
        self.client.observers.append(self)
        self.client.extra_checker_attributes["dbus_object_path"] = self.path

    def detach(self) -> None:
        """Stop announcing anything (the object leaves the bus)."""
        self.attached = False
        if self in self.client.observers:
            self.client.observers.remove(self)
        self.client.extra_checker_attributes.pop("dbus_object_path", None)

    # -- what the object shows ----------------------------------------------

    def properties(self) -> dict[str, Variant]:
        """Every readable property (what GetAll answers)."""
        return {prop.name: Variant(prop.type, prop.get(self))
                for prop in CLIENT_PROPERTIES if prop.get is not None}

    def interfaces_and_properties(self) -> dict[str, dict[str, Variant]]:
        """The four interfaces with their properties, for the ObjectManager."""
        properties = self.properties()
        return {CLIENT_INTERFACE: properties, CLIENT_ALIAS: dict(properties),
                PROPERTIES: {}, INTROSPECTABLE: {}}

    def introspect(self) -> str:
        """The introspection XML of this object."""
        if self._xml is None:
            self._xml = introspection_xml(self.path, [
                INTROSPECTABLE_INTERFACE, PROPERTIES_INTERFACE, CLIENT_INTERFACE_DESCRIPTION,
                CLIENT_ALIAS_DESCRIPTION], [])
        return self._xml

    # -- calls ------------------------------------------------------------

    def call(self, interface: str | None, member: str, signature: str,
             body: list) -> tuple[str, list]:
        """Answer a method call: the reply's signature and body, or CallError."""
        if interface is None:  # allowed by the D-Bus specification
            interface = next((name for name, described in (
                (CLIENT_INTERFACE, CLIENT_INTERFACE_DESCRIPTION),
                (PROPERTIES, PROPERTIES_INTERFACE),
                (INTROSPECTABLE, INTROSPECTABLE_INTERFACE)) if described.method(member)), None)
        if interface in (CLIENT_INTERFACE, CLIENT_ALIAS):
            method = CLIENT_INTERFACE_DESCRIPTION.method(member)
            if method is not None and signature == method.in_signature:
                _ACTIONS[member](self.client, *body)
                return "", []
        elif interface == PROPERTIES:
            if member == "Get" and signature == "ss":
                return "v", [self.get(*body)]
            if member == "Set" and signature == "ssv":
                self.set(*body)
                return "", []
            if member == "GetAll" and signature == "s":
                return "a{sv}", [self.get_all(*body)]
        elif interface == INTROSPECTABLE and member == "Introspect" and signature == "":
            return "s", [self.introspect()]
        raise unknown_method(interface, member, signature)

    def _property(self, interface: str, name: str) -> ClientProperty:
        prop = PROPERTY_BY_NAME.get(name)
        if prop is None or interface not in (CLIENT_INTERFACE, CLIENT_ALIAS):
            raise CallError(PROPERTY_NOT_FOUND, f"{self.path}:{interface}.{name}")
        return prop

    def get(self, interface: str, name: str) -> Variant:
        """Properties.Get: only on a client interface; write-only ``Secret`` is an error."""
        prop = self._property(interface, name)
        if prop.get is None:
            raise CallError(PROPERTY_ACCESS, name)
        return Variant(prop.type, prop.get(self))

    def set(self, interface: str, name: str, value: Variant) -> None:
        """Properties.Set, with the side effects of SERVER.md §8.6."""
        prop = self._property(interface, name)
        if prop.set is None:
            raise CallError(PROPERTY_ACCESS, name)
        converted = prop.coerce(value)
        try:
            prop.set(self.client, converted)
        except (OverflowError, ValueError) as err:  # such as a duration beyond 1000 years
            raise CallError(INVALID_ARGS, f"property {name}: {err}") from None

    def get_all(self, interface: str) -> dict[str, Variant]:
        """Properties.GetAll: a client interface or "" gives all readable ones, others none."""
        if interface in ("", CLIENT_INTERFACE, CLIENT_ALIAS):
            return self.properties()
        return {}

    # -- announcements (ClientObserver) ----------------------------------------

    def property_changed(self, client: Client, name: str) -> None:
        """Announce the property behind attribute ``name`` if its D-Bus value changed."""
        if not self.attached:
            return
        try:
            self._announce_change(name)
        except Exception:  # never let the bus break the client's own logic
            log.exception("Could not announce the change of %s of client %s on D-Bus",
                          name, client.name)

    def _announce_change(self, attribute: str) -> None:
        prop = PROPERTY_BY_ATTRIBUTE.get(attribute)
        if prop is None:
            return
        if prop.emits == "invalidates":
            digest = _secret_digest(self.client.secret)
            if digest != self._secret:
                self._secret = digest
                self._emit(self.path, PROPERTIES, "PropertiesChanged", "sa{sv}as",
                           [CLIENT_INTERFACE, {}, [prop.name]])
            return
        value = prop.get(self)
        if value == self._announced[prop.name]:
            return
        self._announced[prop.name] = value
        variant = Variant(prop.type, value)
        for interface in (CLIENT_INTERFACE, CLIENT_ALIAS):
            self._emit(self.path, interface, "PropertyChanged", "sv", [prop.name, variant])
        self._emit(self.path, PROPERTIES, "PropertiesChanged", "sa{sv}as",
                   [CLIENT_INTERFACE, {prop.name: variant}, []])

    def client_signal(self, client: Client, signal: str, *args) -> None:
        """Send a client event as a signal, on the interface and then on its alias."""
        if not self.attached:
            return
        try:
            described = CLIENT_INTERFACE_DESCRIPTION.signal(signal)
            body = [_CONVERT[arg.type](value) for arg, value in zip(described.args, args,
                                                                     strict=True)]
            for interface in (CLIENT_INTERFACE, CLIENT_ALIAS):
                self._emit(self.path, interface, signal, described.signature, body)
        except Exception:
            log.exception("Could not send the D-Bus signal %s%r of client %s",
                          signal, args, client.name)

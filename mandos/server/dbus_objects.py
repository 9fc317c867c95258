"""What a D-Bus object of the server looks like from outside: interfaces, XML, errors.

The server's objects are described here as plain data (methods, signals,
properties, annotations) so that one description gives both the
introspection XML and the deprecated ``se.bsnet.fukt.Mandos`` copies of the
interfaces.  Nothing here talks to the bus.

dbus-fast's own introspection cannot carry annotations
(``org.freedesktop.DBus.Deprecated``,
``org.freedesktop.DBus.Property.EmitsChangedSignal``, SERVER.md §14.4), so
the XML is written here.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PEER = "org.freedesktop.DBus.Peer"

DEPRECATED = "org.freedesktop.DBus.Deprecated"
EMITS_CHANGED = "org.freedesktop.DBus.Property.EmitsChangedSignal"

# Error names.  The original server is written with dbus-python, which names
# errors after the Python exception raised; clients may have come to match
# on them, so the same names are used (SERVER.md §19 item 16).
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
FAILED = "org.freedesktop.DBus.Error.Failed"
PROPERTY_NOT_FOUND = "org.freedesktop.DBus.Python.DBusPropertyNotFound"
PROPERTY_ACCESS = "org.freedesktop.DBus.Python.DBusPropertyAccessException"
KEY_ERROR = "org.freedesktop.DBus.Python.KeyError"

_DOCTYPE = ('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n')

Annotations = tuple[tuple[str, str], ...]


class CallError(Exception):
    """A method call fails with the D-Bus error ``name`` and the message ``text``."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name = name
        self.text = text


def unknown_method(interface: str | None, member: str, signature: str) -> CallError:
    """The error for a call nothing here answers."""
    return CallError(UNKNOWN_METHOD, f"Method {member!r} with signature {signature!r} "
                                     f"on interface {interface!r} does not exist")


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of a method (``direction`` "in" or "out") or a signal (None)."""

    type: str
    name: str | None = None
    direction: str | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """A method; ``args`` in order, inputs and outputs."""

    name: str
    args: tuple[Arg, ...] = ()
    annotations: Annotations = ()

    @property
    def in_signature(self) -> str:
        """The signature a call must have."""
        return "".join(arg.type for arg in self.args if arg.direction == "in")

    @property
    def out_signature(self) -> str:
        """The signature of the reply."""
        return "".join(arg.type for arg in self.args if arg.direction == "out")


@dataclasses.dataclass(frozen=True)
class Signal:
    """A signal and its arguments."""

    name: str
    args: tuple[Arg, ...] = ()
    annotations: Annotations = ()

    @property
    def signature(self) -> str:
        """The signature of the signal's body."""
        return "".join(arg.type for arg in self.args)


@dataclasses.dataclass(frozen=True)
class Property:
    """A property: type, ``access`` ("read", "write" or "readwrite"), annotations."""

    name: str
    type: str
    access: str
    annotations: Annotations = ()

    @property
    def readable(self) -> bool:
        return self.access in ("read", "readwrite")

    @property
    def writable(self) -> bool:
        return self.access in ("write", "readwrite")


@dataclasses.dataclass(frozen=True)
class Interface:
    """An interface: its members and its own annotations."""

    name: str
    methods: tuple[Method, ...] = ()
    signals: tuple[Signal, ...] = ()
    properties: tuple[Property, ...] = ()
    annotations: Annotations = ()

    def method(self, name: str) -> Method | None:
        """The method called ``name``, if any."""
        return next((method for method in self.methods if method.name == name), None)

    def signal(self, name: str) -> Signal:
        """The signal called ``name``; KeyError if none."""
        for signal in self.signals:
            if signal.name == name:
                return signal
        raise KeyError(name)

    def deprecated_alias(self, name: str) -> "Interface":
        """The same members under another name, marked deprecated."""
        return dataclasses.replace(self, name=name,
                                   annotations=self.annotations + ((DEPRECATED, "true"),))


INTROSPECTABLE_INTERFACE = Interface(INTROSPECTABLE, methods=(
    Method("Introspect", (Arg("s", "xml_data", "out"),)),))

PROPERTIES_INTERFACE = Interface(
    PROPERTIES,
    methods=(
        Method("Get", (Arg("s", "interface_name", "in"), Arg("s", "property_name", "in"),
                       Arg("v", "value", "out"))),
        Method("Set", (Arg("s", "interface_name", "in"), Arg("s", "property_name", "in"),
                       Arg("v", "value", "in"))),
        Method("GetAll", (Arg("s", "interface_name", "in"), Arg("a{sv}", "props", "out"))),
    ),
    signals=(Signal("PropertiesChanged", (Arg("s", "interface_name"),
                                          Arg("a{sv}", "changed_properties"),
                                          Arg("as", "invalidated_properties"))),))

OBJECT_MANAGER_INTERFACE = Interface(
    OBJECT_MANAGER,
    methods=(Method("GetManagedObjects", (
        Arg("a{oa{sa{sv}}}", "objpath_interfaces_and_properties", "out"),)),),
    signals=(Signal("InterfacesAdded", (Arg("o", "object_path"),
                                        Arg("a{sa{sv}}", "interfaces_and_properties"))),
             Signal("InterfacesRemoved", (Arg("o", "object_path"), Arg("as", "interfaces")))))


def _annotate(element: ET.Element, annotations: Annotations) -> None:
    for name, value in annotations:
        ET.SubElement(element, "annotation", name=name, value=value)


def _args(element: ET.Element, args: tuple[Arg, ...]) -> None:
    for arg in args:
        attributes = {"type": arg.type}
        if arg.name:
            attributes["name"] = arg.name
        if arg.direction:
            attributes["direction"] = arg.direction
        ET.SubElement(element, "arg", attributes)


def introspection_xml(path: str | None, interfaces: list[Interface],
                      children: list[str]) -> str:
    """The ``Introspect()`` answer for an object with these interfaces and child nodes."""
    node = ET.Element("node", {"name": path} if path else {})
    for interface in interfaces:
        element = ET.SubElement(node, "interface", name=interface.name)
        for method in interface.methods:
            member = ET.SubElement(element, "method", name=method.name)
            _args(member, method.args)
            _annotate(member, method.annotations)
        for signal in interface.signals:
            member = ET.SubElement(element, "signal", name=signal.name)
            _args(member, signal.args)
            _annotate(member, signal.annotations)
        for prop in interface.properties:
            member = ET.SubElement(element, "property", name=prop.name, type=prop.type,
                                   access=prop.access)
            _annotate(member, prop.annotations)
        _annotate(element, interface.annotations)
    for child in children:
        ET.SubElement(node, "node", name=child)
    ET.indent(node)
    return _DOCTYPE + ET.tostring(node, encoding="unicode") + "\n"

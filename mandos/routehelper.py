"""mandos-client-iprouteadddel: add or delete one direct route for mandos-client.

Usage: ``mandos-client-iprouteadddel [--debug] add|delete ADDRESS INTERFACE``

mandos-client runs this (as root) when a server it found is on the local
link but announced only a global address, which a client with nothing but a
link-local address cannot reach: the client adds a host route to that
address through the interface, connects, and deletes the route again.

The route is always of one shape, the same as
``ip route add ADDRESS dev INTERFACE proto boot scope link table main``:
a unicast route in the main table, protocol "boot", scope "link", whose only
next hop is the interface itself (no gateway).  ADDRESS is an IPv4 or IPv6
literal with an optional prefix length (default: a host route, /32 or
/128).  ``add`` fails if the route exists already; ``delete`` removes the
matching route.

``--debug`` may appear anywhere; the command word is case-insensitive.
Exit status: 0 on success, 64 (EX_USAGE) for bad arguments, 71 (EX_OSERR)
for any netlink failure (no socket, unknown interface, the kernel refused).
``--help``, ``--usage`` and ``--version`` print to standard output and exit 0.
"""

import errno
import os
import socket
import struct
import sys

PROGRAM = "mandos-client-iprouteadddel"
MESSAGE_PREFIX = f"Mandos plugin helper {PROGRAM}: "
USAGE = f"Usage: {PROGRAM} [--debug] add|delete ADDRESS INTERFACE\n"
HELP = USAGE + """\
Add or delete a direct route to ADDRESS (IPv4 or IPv6, optionally with a
prefix length; default a host route) through INTERFACE in the main routing
table, with protocol "boot" and scope "link".  Must run as root.

  --debug      describe what is done on standard error
  --help, -?   show this help
  --usage      show the usage line
  --version    show the version
"""

EX_OK = 0
EX_USAGE = 64
EX_OSERR = 71

COMMANDS = ("add", "delete")
LONG_OPTIONS = ("debug", "help", "usage", "version")

# rtnetlink numbers (linux/rtnetlink.h, linux/netlink.h).
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port ID
NETLINK_TIMEOUT = 10.0  # seconds; the kernel answers at once or never


class UsageError(Exception):
    """The command line is wrong (exit status 64)."""


class Finished(Exception):
    """--help, --usage or --version: print ``text`` and exit 0."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class NetlinkError(Exception):
    """Netlink failed or the kernel refused the request (exit status 71)."""


class Request:
    """What the command line asks for, fully validated."""

    __slots__ = ("command", "family", "address", "prefix_length", "interface", "debug")

    def __init__(self, command: str, family: int, address: bytes,
                 prefix_length: int, interface: str, debug: bool) -> None:
        self.command = command              # "add" or "delete"
        self.family = family                # AF_INET or AF_INET6
        self.address = address              # packed, 4 or 16 bytes
        self.prefix_length = prefix_length  # 0-32 or 0-128
        self.interface = interface
        self.debug = debug

    def destination(self) -> str:
        """ADDRESS/PREFIX in canonical text form, for messages."""
        return f"{socket.inet_ntop(self.family, self.address)}/{self.prefix_length}"


def _long_option(arg: str) -> str:
    """The full name of a long option given as ``--name`` or a unique prefix."""
    name = arg[2:]
    if name in LONG_OPTIONS:
        return name
    matches = [option for option in LONG_OPTIONS if name and option.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    if "=" in name and name.split("=", 1)[0] in LONG_OPTIONS:
        raise UsageError(f"option '--{name.split('=', 1)[0]}' doesn't allow an argument")
    if matches:
        raise UsageError(f"option '{arg}' is ambiguous")
    raise UsageError(f"unrecognized option '{arg}'")


def parse_address(text: str) -> tuple[int, bytes, int]:
    """``ADDRESS[/PREFIX]`` → (family, packed address, prefix length).

    Only numeric literals are accepted: the address comes from a network
    announcement that anybody on the link can forge, and this program runs
    as root, so it must never trigger a name look-up or accept anything
    looser (zone suffixes, "127.1" shorthand, signs or spaces in the prefix).
    """
    address_text, slash, prefix_text = text.partition("/")
    for family, bits in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
        try:
            packed = socket.inet_pton(family, address_text)
        except (OSError, ValueError):
            continue
        break
    else:
        raise UsageError(f"bad address: {text!r}")
    if not slash:
        return family, packed, bits
    if not (prefix_text.isascii() and prefix_text.isdigit()
            and len(prefix_text) <= 3 and int(prefix_text) <= bits):
        raise UsageError(f"bad prefix length in address: {text!r}")
    return family, packed, int(prefix_text)


def parse_args(argv: list[str]) -> Request:
    """Validate the whole command line before anything touches the kernel.

    Raises UsageError for anything but exactly a command word, an address
    and an interface name (plus ``--debug`` anywhere); Finished for
    ``--help``, ``--usage`` and ``--version``.
    """
    debug = False
    positional: list[str] = []
    options_ended = False
    for arg in argv:
        if options_ended or arg == "-" or not arg.startswith("-"):
            positional.append(arg)
        elif arg == "--":
            options_ended = True
        elif arg == "-?":
            raise Finished(HELP)
        elif arg.startswith("--"):
            option = _long_option(arg)
            if option == "debug":
                debug = True
            elif option == "help":
                raise Finished(HELP)
            elif option == "usage":
                raise Finished(USAGE)
            else:
                from mandos import __version__
                raise Finished(f"{PROGRAM} {__version__}\n")
        else:
            raise UsageError(f"invalid option -- '{arg[1:]}'")
    if len(positional) != 3:
        raise UsageError(f"expected 3 arguments (add|delete ADDRESS INTERFACE), "
                         f"got {len(positional)}")
    command_text, address_text, interface = positional
    command = command_text.lower() if command_text.isascii() else ""
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command_text!r} (use add or delete)")
    family, address, prefix_length = parse_address(address_text)
    return Request(command, family, address, prefix_length, interface, debug)


def _import_rtmsg():
    """pyroute2's route message class, loaded as cheaply as possible (15 ms, not 130)."""
    from mandos import pyroute2_parts
    return pyroute2_parts.load("pyroute2.netlink.rtnl.rtmsg").rtmsg


def build_message(request: Request, ifindex: int, sequence: int = 1) -> bytes:
    """The rtnetlink request for ``request`` on interface ``ifindex``.

    The route's shape is fixed here and nowhere else: main table, protocol
    boot, scope link, unicast, the interface as the only next hop and no
    gateway.  Whoever runs this program can choose the destination and the
    interface, not where the traffic goes beyond the link.
    """
    rtmsg = _import_rtmsg()
    message = rtmsg()
    message["family"] = request.family
    message["dst_len"] = request.prefix_length
    message["table"] = RT_TABLE_MAIN
    message["proto"] = RTPROT_BOOT
    message["scope"] = RT_SCOPE_LINK
    message["type"] = RTN_UNICAST
    message["attrs"] = [
        ("RTA_TABLE", RT_TABLE_MAIN),
        ("RTA_DST", socket.inet_ntop(request.family, request.address)),
        ("RTA_OIF", ifindex),
    ]
    header = message["header"]
    if request.command == "add":
        header["type"] = RTM_NEWROUTE
        # Exclusive creation: never replace a route somebody else made.
        header["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    else:
        header["type"] = RTM_DELROUTE
        header["flags"] = NLM_F_REQUEST | NLM_F_ACK
    header["sequence_number"] = sequence
    message.encode()
    return bytes(message.data)


def send_request(data: bytes, sequence: int = 1) -> None:
    """Send one rtnetlink request and wait for the kernel's acknowledgement.

    Raises NetlinkError with the kernel's reason if it refuses.
    """
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
    except OSError as err:
        raise NetlinkError(f"cannot open a netlink socket: {err.strerror}") from None
    with sock:
        try:
            sock.settimeout(NETLINK_TIMEOUT)
            sock.bind((0, 0))
            sock.send(data)
            while True:
                reply, (sender, _groups) = sock.recvfrom(65536)
                if sender != 0:
                    continue  # only the kernel's answer counts, not another process's
                offset = 0
                while offset + NLMSG_HEADER.size <= len(reply):
                    length, kind, _flags, seq, _port = NLMSG_HEADER.unpack_from(reply, offset)
                    if length < NLMSG_HEADER.size:
                        break
                    if kind == NLMSG_ERROR and seq == sequence:
                        (error,) = struct.unpack_from("=i", reply, offset + NLMSG_HEADER.size)
                        if error == -errno.ESRCH:
                            raise NetlinkError("no such route")
                        if error:
                            raise NetlinkError(os.strerror(-error))
                        return
                    offset += (length + 3) & ~3
        except socket.timeout:
            raise NetlinkError("no answer from the kernel") from None
        except OSError as err:
            raise NetlinkError(err.strerror or str(err)) from None


def _say(message: str) -> None:
    sys.stderr.write(MESSAGE_PREFIX + message + "\n")
    sys.stderr.flush()


def run(request: Request) -> None:
    """Carry out a validated request; raises NetlinkError."""
    try:
        ifindex = socket.if_nametoindex(request.interface)
    except (OSError, ValueError):
        raise NetlinkError(f"unknown interface {request.interface!r}") from None
    what = f"{request.destination()} dev {request.interface}"
    if request.debug:
        _say(f"{'Adding' if request.command == 'add' else 'Deleting'} route {what} "
             f"(interface index {ifindex})")
    try:
        data = build_message(request, ifindex)
    except ImportError as err:
        raise NetlinkError(f"pyroute2 is not available: {err}") from None
    try:
        send_request(data)
    except NetlinkError as err:
        raise NetlinkError(f"cannot {request.command} route {what}: {err}") from None
    if request.debug:
        _say(f"{'Added' if request.command == 'add' else 'Deleted'} route {what}")


def main(argv: list[str] | None = None) -> int:
    """Run the helper; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        request = parse_args(argv)
    except Finished as finished:
        sys.stdout.write(finished.text)
        sys.stdout.flush()
        return EX_OK
    except UsageError as err:
        _say(str(err))
        _say(USAGE.strip())
        return EX_USAGE
    try:
        run(request)
    except NetlinkError as err:
        _say(str(err))
        return EX_OSERR
    return EX_OK

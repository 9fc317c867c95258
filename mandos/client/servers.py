"""Where the client looks for Mandos servers.

A *source* of servers yields :class:`ServerAddress` records: the fixed
``--connect`` address here; Zeroconf discovery produces the same records.
"""

# _socket, not socket: the wrapper module imports enum and selectors,
# milliseconds at every boot before the first connection.
import _socket

from mandos.cmdline import UsageError


class ServerAddress:
    """One place to try: numeric address, port, family and interface scope."""

    __slots__ = ("address", "port", "family", "ifindex")

    def __init__(self, address: str, port: int, family: int, ifindex: int = 0) -> None:
        self.address = address
        self.port = port
        self.family = family
        self.ifindex = ifindex  # 0: unspecified

    def is_link_local(self) -> bool:
        """fe80::/10 or 169.254.0.0/16."""
        try:
            packed = _socket.inet_pton(self.family, self.address)
        except (OSError, ValueError):
            return False
        if self.family == _socket.AF_INET6:
            return packed[0] == 0xFE and packed[1] & 0xC0 == 0x80
        return packed[:2] == b"\xa9\xfe"

    def sockaddr(self) -> tuple:
        """The address tuple for socket.connect()."""
        if self.family == _socket.AF_INET6:
            scope = self.ifindex if self.is_link_local() else 0
            return (self.address, self.port, 0, scope)
        return (self.address, self.port)

    def __str__(self) -> str:
        if self.family == _socket.AF_INET6:
            scope = f"%{self.ifindex}" if self.ifindex and self.is_link_local() else ""
            return f"[{self.address}{scope}]:{self.port}"
        return f"{self.address}:{self.port}"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ServerAddress)
                and (self.address, self.port, self.family, self.ifindex)
                == (other.address, other.port, other.family, other.ifindex))

    def __hash__(self) -> int:
        return hash((self.address, self.port, self.family, self.ifindex))


def parse_connect(text: str, ifindex: int = 0) -> ServerAddress:
    """Parse ``--connect ADDRESS:PORT``, split at the last colon.

    IPv6 addresses may be bracketed (``[fe80::1]:4711``) or not
    (``fe80::1:4711``).  Raises UsageError for a missing colon or bad port.
    The address itself is checked at connection time, as the original does.
    """
    address, colon, port_text = text.rpartition(":")
    if not colon:
        raise UsageError(f"No colon in address: {text!r}")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise UsageError(f"Bad port number: {port_text!r}")
    if ":" in address:
        if address.startswith("[") and address.endswith("]"):
            address = address[1:-1]
        family = _socket.AF_INET6
    else:
        family = _socket.AF_INET
    return ServerAddress(address, int(port_text), family, ifindex)

"""All clients of the server, found by name or by the key that identifies them."""

from __future__ import annotations

import logging

from mandos.server.client import Client
from mandos.server.clients_conf import REFUSED_KEY_ID

log = logging.getLogger(__name__)


class ServerObserver:
    """Receives server-level events; subclasses override what they need."""

    def client_added(self, client: Client) -> None:
        """``client`` was added (at start-up)."""

    def client_removed(self, client: Client) -> None:
        """``client`` was removed (RemoveClient, or shutdown)."""

    def client_not_found(self, key_id: str, address: str) -> None:
        """An unknown key connected from ``address``."""


class ClientRegistry:
    """The clients, in ``clients.conf`` order."""

    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.observers: list[ServerObserver] = []

    def __iter__(self):
        return iter(list(self.clients.values()))

    def __len__(self) -> int:
        return len(self.clients)

    def add(self, client: Client) -> None:
        """Add a client and tell the observers."""
        self.clients[client.name] = client
        for observer in list(self.observers):
            observer.client_added(client)

    def remove(self, name: str) -> Client:
        """Remove a client: it is disabled quietly and forgotten.  KeyError if unknown."""
        client = self.clients.pop(name)
        client.disable(quiet=True)
        client.stop()
        for observer in list(self.observers):
            observer.client_removed(client)
        return client

    def find_by_key_id(self, key_id: str) -> Client | None:
        """The client with this TLS key ID; never for the refused empty-key ID."""
        key_id = key_id.upper()
        if not key_id or key_id == REFUSED_KEY_ID:
            return None
        for client in self.clients.values():
            if client.key_id == key_id:
                return client
        return None

    def find_by_fingerprint(self, fingerprint: str) -> Client | None:
        """The client with this OpenPGP fingerprint (legacy TLS)."""
        fingerprint = fingerprint.upper()
        if not fingerprint:
            return None
        for client in self.clients.values():
            if client.fingerprint == fingerprint:
                return client
        return None

    def not_found(self, key_id: str, address: str) -> None:
        """Report a connection from an unknown (or refused) key."""
        log.info("Client not found for key ID %s, address %s", key_id, address)
        for observer in list(self.observers):
            observer.client_not_found(key_id, address)

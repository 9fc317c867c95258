"""Mandos: unattended unlocking of encrypted root file systems over the network.

This package holds the library (TLS, keys, OpenPGP, discovery, interfaces,
client, server).  It must stay cheap to import: submodules import their
heavy dependencies lazily.
"""

__version__ = "0.1.0"

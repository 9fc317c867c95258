"""The Mandos server: gives each known, enabled, recently seen client its secret.

One concern per module:

``settings``      command line and ``mandos.conf``
``clients_conf``  ``clients.conf``: parsing, expansion, per-client settings
``client``        one client's run-time state and the policy around it
                  (enable/disable, expiry, checker scheduling, approval)
``checker``       running one checker command
``registry``      all clients, lookup by key ID, server-level events
``protocol``      the wire protocol and TLS of one connection (blocking)
``listener``      accepting connections, running them concurrently
``state``         the persistent state file (JSON), load and merge
``announce``      Zeroconf publication
``dbus_api``      the D-Bus control interface
``logs``          syslog and debug logging
``main``          the start-up order, privileges, signals, shutdown
"""

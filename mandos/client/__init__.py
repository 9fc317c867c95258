"""mandos-client: get this machine's password from a Mandos server.

Modules: ``options`` (command line), ``privileges`` (the set-user-ID
model), ``servers`` (where to connect), ``attempt`` (one connection: the
wire protocol and TLS), ``main`` (the run sequence, retries, signals and
the end sequence).
"""

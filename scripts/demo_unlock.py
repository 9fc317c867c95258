"""The body of scripts/demo: a local Mandos server unlocks a freshly keyed client.

1. mandos-keygen makes a new client key set and the clients.conf section
   holding the passphrase, encrypted to that key.
2. mandos, the server, starts on loopback ([::1]) with that clients.conf.
3. plugin-runner runs as cryptsetup would run it (``plugin-runner ""``,
   CRYPTTAB_* set), from a tree laid out like the initial RAM disk; its
   mandos-client plugin connects, gets and decrypts the passphrase, and the
   runner prints it.
4. Everything started here is stopped and removed again.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
PASSPHRASE = os.environ.get("DEMO_PASSPHRASE", "correct horse battery staple")
PLUGIN_USER = 65534


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        return sock.getsockname()[1]


def make_keys(root: str) -> tuple[str, str]:
    """Client keys and the server's clients.conf; returns (key dir, config dir)."""
    keys = os.path.join(root, "keys")
    config = os.path.join(root, "server-config")
    os.makedirs(config)
    keygen = os.path.join(REPO, "bin", "mandos-keygen")
    started = time.monotonic()
    subprocess.run([keygen, "--dir", keys], check=True, stdout=subprocess.DEVNULL)
    passfile = os.path.join(root, "passphrase")
    with open(passfile, "w") as file:
        file.write(PASSPHRASE)
    section = subprocess.run([keygen, "--dir", keys, "--passfile", passfile, "--no-ssh",
                              "--name", "demo-client"], check=True, capture_output=True,
                             text=True).stdout
    os.unlink(passfile)
    say(f"made client keys and its clients.conf section in "
        f"{time.monotonic() - started:.1f} s")
    with open(os.path.join(config, "clients.conf"), "w") as file:
        # The checker would normally ping the client; here it always succeeds.
        file.write("[DEFAULT]\nchecker = true\n\n" + section)
    os.chmod(os.path.join(config, "clients.conf"), 0o600)
    return keys, config


def start_server(root: str, config: str, port: int) -> subprocess.Popen:
    state = os.path.join(root, "server-state")
    os.makedirs(state)
    os.chown(state, PLUGIN_USER, PLUGIN_USER)  # the server drops to 65534 here
    log = open(os.path.join(root, "server.log"), "wb")
    server = subprocess.Popen(
        [os.path.join(REPO, "bin", "mandos"), "--foreground", "--no-dbus", "--no-zeroconf",
         "--address", "::1", "--port", str(port), "--configdir", config,
         "--statedir", state, "--debuglevel", "INFO"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            with open(log.name, errors="replace") as output:
                sys.stderr.write(output.read()[-3000:])
            raise RuntimeError(f"the server exited with status {server.returncode}")
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("::1", port)) == 0:
                say(f"server listening on [::1]:{port}")
                return server
        time.sleep(0.05)
    raise RuntimeError("the server did not start listening")


def install_initramfs_tree(root: str, keys: str) -> str:
    """<root>/lib/mandos and <root>/conf as the initial RAM disk has them."""
    libdir = os.path.join(root, "lib", "mandos")
    plugins = os.path.join(libdir, "plugins.d")
    os.makedirs(plugins)
    for package in ("plugin_runner", "mandos"):
        os.symlink(os.path.join(REPO, package), os.path.join(libdir, package))
    shutil.copy(os.path.join(REPO, "bin", "plugin-runner"), libdir)
    for plugin in ("mandos-client", "password-prompt"):
        shutil.copy(os.path.join(REPO, "plugins.d", plugin), plugins)
    # As packaged: the network client may raise privileges (set-user-ID,
    # honoured by plugin-runner).
    os.chmod(os.path.join(plugins, "mandos-client"), 0o4755)
    conf = os.path.join(root, "conf")
    shutil.copytree(keys, conf)
    for name in os.listdir(conf):  # readable by the plugin user only
        os.chown(os.path.join(conf, name), PLUGIN_USER, PLUGIN_USER)
        os.chmod(os.path.join(conf, name), 0o600)
    os.chown(conf, PLUGIN_USER, PLUGIN_USER)
    for dirpath, dirnames, _ in os.walk(os.path.join(root, "lib")):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    os.chmod(root, 0o755)
    return libdir


def main() -> int:
    root = tempfile.mkdtemp(prefix="mandos-demo-")
    os.chmod(root, 0o755)  # the server and the plugins run as uid 65534
    server = None
    try:
        keys, config = make_keys(root)
        port = free_port()
        server = start_server(root, config, port)
        libdir = install_initramfs_tree(root, keys)
        conf = os.path.join(root, "conf")
        client_options = ",".join([
            f"--connect=[::1]:{port}", "--interface=none",
            f"--pubkey={conf}/pubkey.txt", f"--seckey={conf}/seckey.txt",
            f"--tls-pubkey={conf}/tls-pubkey.pem", f"--tls-privkey={conf}/tls-privkey.pem"])
        env = dict(os.environ, CRYPTTAB_NAME="demo_crypt",
                   CRYPTTAB_SOURCE="/dev/disk/by-uuid/demo", CRYPTTAB_KEY="none")
        started = time.monotonic()
        runner = subprocess.run(
            [os.path.join(libdir, "plugin-runner"), "",
             "--plugin-dir", os.path.join(libdir, "plugins.d"),
             "--config-file", os.path.join(root, "no-plugin-runner.conf"),
             "--options-for", "mandos-client:" + client_options],
            stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=60)
        elapsed = time.monotonic() - started
        if runner.returncode != 0 or runner.stdout != PASSPHRASE.encode():
            say(f"unlock FAILED (plugin-runner exit status {runner.returncode})")
            sys.stderr.buffer.write(runner.stderr)
            return 1
        say(f"plugin-runner got the passphrase from the server in {elapsed:.3f} s; "
            "it would hand cryptsetup:")
        sys.stdout.buffer.write(runner.stdout + b"\n")
        return 0
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            say("server stopped")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

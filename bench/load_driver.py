#!/usr/bin/python3
"""Load driver for a Mandos server: many clients asking for their secret at once.

Each of ``concurrency`` threads loops: connect, send the version line, do
the TLS handshake as mandos-client does (TLS server, presenting a raw
public key), read until close_notify, close.  An attempt counts as an
unlock when it brought at least one byte; nothing is decrypted, so this
measures the server, not gpg.  GnuTLS calls release the GIL (ctypes), so
threads are enough to keep a server busy.

    /usr/bin/python3 bench/load_driver.py --connect 127.0.0.1:PORT \\
        --tls-pubkey tls-pubkey.pem --tls-privkey tls-privkey.pem \\
        --concurrency 1,10,50 --duration 5

With ``--spawn`` instead of ``--connect`` it starts a server of its own
(our Listener in a child process, knowing one client with a freshly made
key, or the keys given) and drives that; ``--serve HOST:PORT`` is that
child.  Only loopback addresses are accepted: this is a load generator.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mandos import gnutls  # noqa: E402

VERSION_LINE = b"1\r\n"
ATTEMPT_TIMEOUT = 30.0
# What the spawned server sends: a stand-in for an OpenPGP message of the
# usual size.
SPAWNED_SECRET_SIZE = 1200


# -- addresses ---------------------------------------------------------------------

def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def loopback_target(address: str, port: int) -> tuple[int, tuple]:
    """(family, sockaddr) of ``address``; ValueError unless it is loopback.

    A load generator must not be pointed at someone else's server by a typo.
    """
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    for family, _, _, _, sockaddr in infos:
        if not _is_loopback(sockaddr[0]):
            raise ValueError(f"{address} is not a loopback address")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


# -- driving -----------------------------------------------------------------------

def _attempt(family: int, sockaddr: tuple, creds: gnutls.CertificateCredentials,
             priority: str) -> int:
    """One unlock attempt; the number of bytes received (raises on errors)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(ATTEMPT_TIMEOUT)
        sock.connect(sockaddr)
        sock.settimeout(None)  # blocking: GnuTLS does its own timing
        sock.sendall(VERSION_LINE)
        with gnutls.Session(gnutls.Role.SERVER, creds, priority) as session:
            session.set_transport(sock)
            session.set_handshake_timeout(ATTEMPT_TIMEOUT)
            session.set_read_timeout(ATTEMPT_TIMEOUT)
            session.handshake()
            received = len(session.recv_until_close_notify())
            try:
                session.bye(gnutls.SHUT_RDWR)
            except gnutls.GnuTLSError:
                pass  # the data is complete: close_notify came first
            return received


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def run_load(address: str, port: int, keyfiles: tuple[str, str], concurrency: int,
             duration: float | None = 10.0, count: int | None = None,
             priority: str = gnutls.DEFAULT_PRIORITY) -> dict:
    """Drive a Mandos server at ``address``:``port`` (loopback only).

    ``keyfiles`` is ``(tls-pubkey.pem, tls-privkey.pem)`` of a client the
    server knows.  Runs ``concurrency`` threads for ``duration`` seconds, or
    until ``count`` attempts were started when that is given.  Returns
    counts, unlocks per second and latencies in milliseconds (of unlocks,
    from connect to close_notify).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if duration is None and count is None:
        raise ValueError("give a duration or a count")
    family, sockaddr = loopback_target(address, port)
    creds = gnutls.RawPublicKeyCredentials.from_files(*keyfiles)
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counters = {"started": 0, "empty": 0}
    start = time.monotonic()
    deadline = None if duration is None else start + duration

    def worker() -> None:
        while True:
            with lock:
                if count is not None and counters["started"] >= count:
                    return
                counters["started"] += 1
            if deadline is not None and time.monotonic() >= deadline:
                return
            began = time.monotonic()
            try:
                received = _attempt(family, sockaddr, creds, priority)
            except (OSError, gnutls.GnuTLSError) as err:
                with lock:
                    key = f"{type(err).__name__}: {err}"
                    errors[key] = errors.get(key, 0) + 1
                continue
            took = time.monotonic() - began
            with lock:
                if received > 0:
                    latencies.append(took)
                else:
                    counters["empty"] += 1

    threads = [threading.Thread(target=worker, name=f"load-{n}", daemon=True)
               for n in range(concurrency)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        creds.close()
    elapsed = time.monotonic() - start
    latencies.sort()
    unlocks = len(latencies)
    failures = sum(errors.values())
    return {
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 3),
        "attempts": unlocks + counters["empty"] + failures,
        "unlocks": unlocks,
        "empty": counters["empty"],
        "failures": failures,
        "unlocks_per_s": round(unlocks / elapsed, 1) if elapsed > 0 else 0.0,
        "median_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2) if latencies else None,
        "errors": errors,
    }


# -- a server to drive ------------------------------------------------------------------

def serve(address: str, port: int, pubkey: str, max_handshakes: int) -> None:
    """Run our Listener knowing one client (the key in ``pubkey``) until SIGTERM/SIGINT.

    Prints the port it listens on as the first line of standard output.
    """
    import asyncio

    from mandos.server.client import Client
    from mandos.server.clients_conf import ClientConfig
    from mandos.server.listener import LISTEN_BACKLOG, Listener
    from mandos.server.registry import ClientRegistry

    family, sockaddr = loopback_target(address, port)
    key_id = _key_id_of(pubkey)

    async def no_checker(command: str) -> int:
        return 0

    async def main() -> None:
        registry = ClientRegistry()
        registry.add(Client(ClientConfig(name="bench", key_id=key_id,
                                         secret=os.urandom(SPAWNED_SECRET_SIZE)), no_checker))
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        listener = Listener(sock, registry, max_handshakes=max_handshakes)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await listener.start()
        print(listener.port, flush=True)
        await stop.wait()
        await listener.close()
        for client in registry:
            client.stop()
        sock.close()

    asyncio.run(main())


def _key_id_of(pubkey_path: str) -> str:
    from cryptography.hazmat.primitives import serialization

    from mandos import keys

    return keys.key_id(serialization.load_pem_public_key(Path(pubkey_path).read_bytes()))


class SpawnedServer:
    """Our Listener in a child process (``--serve``), for the duration of a ``with``."""

    def __init__(self, address: str, pubkey: str, max_handshakes: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", f"[{address}]:0" if ":" in address
             else f"{address}:0", "--tls-pubkey", pubkey,
             "--max-handshakes", str(max_handshakes)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError("the spawned server did not start")
        self.port = int(line)

    def close(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after 10 s) and reap it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()

    def __enter__(self) -> SpawnedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- command line -------------------------------------------------------------------------

def _print_row(result: dict) -> None:
    print(f"concurrency {result['concurrency']:>4}: {result['unlocks']:>6} unlocks in "
          f"{result['elapsed_s']:6.2f} s = {result['unlocks_per_s']:8.1f}/s, "
          f"median {result['median_ms']} ms, p99 {result['p99_ms']} ms, "
          f"empty {result['empty']}, failed {result['failures']}")
    for message, times in sorted(result["errors"].items()):
        print(f"    {times} x {message}")


def main(argv: list[str] | None = None) -> int:
    """The command line; see the module's docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--connect", metavar="HOST:PORT", help="a running server (loopback)")
    target.add_argument("--spawn", metavar="HOST", nargs="?", const="127.0.0.1",
                        help="start our Listener on HOST (default 127.0.0.1) and drive it")
    target.add_argument("--serve", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--tls-pubkey", help="the client's tls-pubkey.pem")
    parser.add_argument("--tls-privkey", help="the client's tls-privkey.pem")
    parser.add_argument("--concurrency", default="10",
                        help="connections at once; a comma-separated list runs each in turn")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--count", type=int, help="stop after this many attempts")
    parser.add_argument("--max-handshakes", type=int, default=64,
                        help="the spawned server's worker threads")
    parser.add_argument("--priority", default=gnutls.DEFAULT_PRIORITY)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)

    if args.serve:
        if not args.tls_pubkey:
            parser.error("--serve needs --tls-pubkey")
        host, port = parse_host_port(args.serve)
        serve(host, port, args.tls_pubkey, args.max_handshakes)
        return 0
    try:
        levels = [int(n) for n in args.concurrency.split(",")]
    except ValueError:
        parser.error("--concurrency takes numbers separated by commas")
    duration = None if args.count is not None else args.duration

    temporary = None
    try:
        if args.tls_pubkey and args.tls_privkey:
            keyfiles = (args.tls_pubkey, args.tls_privkey)
        elif args.spawn and not (args.tls_pubkey or args.tls_privkey):
            from mandos import keys

            temporary = tempfile.mkdtemp(prefix="mandos-load-")
            public_pem, private_pem = keys.generate_tls_keypair()
            keyfiles = (os.path.join(temporary, "tls-pubkey.pem"),
                        os.path.join(temporary, "tls-privkey.pem"))
            keys.write_key_file(keyfiles[0], public_pem)
            keys.write_key_file(keyfiles[1], bytes(private_pem))
        else:
            parser.error("give --tls-pubkey and --tls-privkey")

        def drive(host: str, port: int) -> list[dict]:
            results = []
            for level in levels:
                result = run_load(host, port, keyfiles, level, duration, args.count,
                                  args.priority)
                results.append(result)
                if not args.json:
                    _print_row(result)
            return results

        if args.spawn:
            with SpawnedServer(args.spawn, keyfiles[0], args.max_handshakes) as server:
                results = drive(args.spawn, server.port)
        else:
            host, port = parse_host_port(args.connect)
            results = drive(host, port)
    except ValueError as err:
        print(f"load_driver: {err}", file=sys.stderr)
        return 2
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if all(r["unlocks"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

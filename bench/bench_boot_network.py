#!/usr/bin/python3
"""Boot network path: interface down → passphrase, our mandos-client against the original.

Everything runs in network namespaces of its own (tests/e2e/netns.py),
deleted at the end.  Each client host's ``eth0`` is plugged into a switch
(a bridge in a hub namespace, so the server's link stays up whatever the
client does) and is DOWN when a run starts; the client brings it up, waits
as it does, finds or connects to the server, and prints the passphrase.
A run is timed from the start of the client process to the last byte of
the passphrase on its standard output (the exit comes a little later and
is reported too).  After each run the interface is down again (the client
took it down) and its link-local address is gone, so every run starts
from scratch, with a new duplicate-address detection.

Scenarios (runs of our client and the original alternate, rounds rotate):

* (a) against a server that is already announcing, with the kernel's
  default duplicate-address detection (DAD on: a new link-local address
  is "tentative" for a second or two) and, for reference, with DAD off;
  in Zeroconf mode (no ``--connect``) and with
  ``--connect [fe80::…]:PORT --interface eth0``; against our server and
  the original server (announcing through avahi-daemon);
* (b) two servers announced on the link, one dead: "refused" (announced,
  nothing listens) or "hung" (accepts the connection, never answers).
  Interface down, DAD off, Zeroconf mode.  Which server a client finds
  first is up to the network; a run that has not succeeded after
  ``--dead-timeout`` seconds counts as that many seconds (and is counted).

Keys come from our mandos-keygen (its defaults: RSA 4096).  Nothing is
asserted; the ratios ours/original are printed.

Usage: /usr/bin/python3 bench/bench_boot_network.py [--rounds 10] [--dead-rounds 8]
       [--no-original-server] [--key-bits BITS]
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import netns  # noqa: E402

PASSWORD = b"benchmark boot passphrase"
PORT = 4711
RUN_TIMEOUT = 60.0


class Outcome:
    def __init__(self, passphrase: float | None, exited: float | None, note: str = "") -> None:
        self.passphrase = passphrase  # seconds to the passphrase; None: failed
        self.exited = exited
        self.note = note


def time_client(host: netns.Host, argv: list[str], log: Path, *, timeout: float,
                env: dict[str, str] | None = None) -> Outcome:
    """Run a client in ``host``; seconds until the passphrase was complete."""
    command = host.command(argv)
    with open(log, "wb") as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=errors, env=env or netns.client_env(),
                                   start_new_session=True)
    assert process.stdout is not None
    output = b""
    got = None
    deadline = start + timeout
    fd = process.stdout.fileno()
    while got is None:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        data = os.read(fd, 4096)
        if not data:
            break
        output += data
        if output == PASSWORD:
            got = time.perf_counter() - start
    exited = None
    try:
        process.wait(timeout=max(1.0, deadline - time.perf_counter()) if got else 0.5)
        exited = time.perf_counter() - start
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    process.stdout.close()
    note = ""
    if got is None:
        tail = log.read_bytes()[-600:].decode(errors="replace")
        note = f"no passphrase (exit {process.returncode}, output {output!r}): {tail}"
    return Outcome(got, exited, note)


def reset(host: netns.Host) -> None:
    """The state a run must start from: eth0 down, no process left in the host."""
    netns.wait_until(lambda: not host.pids(), 3)
    for pid in host.pids():  # e.g. a killed client's gpg-agent
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if host.is_up("eth0"):
        host.ip("link", "set", "eth0", "down")
    netns.wait_until(lambda: not [a for a, _ in host.ipv6_addresses("eth0")], 3)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p90(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


class Scenario:
    def __init__(self, name: str, host: netns.Host, argv: dict[str, list[str]], *,
                 timeout: float = RUN_TIMEOUT, cap: float | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.host = host
        self.argv = argv  # per client kind
        self.timeout = timeout
        self.cap = cap  # failed runs count as this many seconds (None: left out)
        self.env = env
        self.times: dict[str, list[float]] = {kind: [] for kind in argv}
        self.exits: dict[str, list[float]] = {kind: [] for kind in argv}
        self.failures: dict[str, int] = {kind: 0 for kind in argv}
        self.notes: list[str] = []

    def run(self, kind: str, log: Path) -> None:
        reset(self.host)
        outcome = time_client(self.host, self.argv[kind], log, timeout=self.timeout,
                              env=self.env)
        if outcome.passphrase is None:
            self.failures[kind] += 1
            self.notes.append(f"{kind}: {outcome.note[:300]}")
            if self.cap is not None:
                self.times[kind].append(self.cap)
        else:
            self.times[kind].append(outcome.passphrase)
            if outcome.exited is not None:
                self.exits[kind].append(outcome.exited)
        reset(self.host)


def build(lab: netns.Lab, args, work: Path) -> list[list[Scenario]]:
    """Hosts, servers and the scenario groups (a) and (b)."""
    print("making keys ...", flush=True)
    keys, section = netns.make_keys(work, "benchclient", PASSWORD, bits=args.key_bits)
    hooks = work / "hooks"
    hooks.mkdir()
    os.chmod(hooks, 0o755)

    def clients(connect: str | None) -> dict[str, list[str]]:
        extra = {} if connect is None else {"connect": connect, "interface": "eth0"}
        return {kind: netns.client_command(kind, keys, hooks, **extra)
                for kind in ("ours", "original")}

    groups: list[list[Scenario]] = []
    # (a) Segment "a": our server; client hosts with DAD on and off.
    server = lab.host("srv", hostname="mandos-server")
    lab.plug(server, "eth0", "a")
    dad_on = lab.host("clion", hostname="client-dad-on")
    lab.plug(dad_on, "eth0", "a", up=False)
    dad_off = lab.host("clioff", hostname="client-dad-off", dad=False)
    lab.plug(dad_off, "eth0", "a", up=False)
    address = server.link_local("eth0")
    netns.start_our_server(server, work / "our-server", section, port=PORT)
    connect = f"[{address}]:{PORT}"
    first = [Scenario("DAD on,  Zeroconf,  our server", dad_on, clients(None)),
             Scenario("DAD on,  --connect, our server", dad_on, clients(connect))]
    reference = [Scenario("DAD off, Zeroconf,  our server", dad_off, clients(None)),
                 Scenario("DAD off, --connect, our server", dad_off, clients(connect))]
    if args.original_server:
        # Segment "b": the original server, announcing through avahi-daemon.
        original = lab.host("osrv", hostname="original-server")
        lab.plug(original, "eth0", "b")
        client_b = lab.host("clib", hostname="client-b")
        lab.plug(client_b, "eth0", "b", up=False)
        original_address = original.link_local("eth0")
        _bus_process, bus = netns.start_system_bus(original, work / "bus")
        netns.start_avahi(original, work / "avahi", "eth0", bus=bus)
        netns.start_original_server(original, work / "original-server", section, bus,
                                    port=PORT)
        first += [Scenario("DAD on,  Zeroconf,  original server", client_b, clients(None)),
                  Scenario("DAD on,  --connect, original server", client_b,
                           clients(f"[{original_address}]:{PORT}"))]
    groups += [first, reference]

    # (b) Segments "r" and "h": a live server and a dead one each.
    dead = []
    for kind, segment in (("refused", "r"), ("hung", "h")):
        live = lab.host(f"live{segment}", hostname=f"live-{kind}")
        gone = lab.host(f"dead{segment}", hostname=f"dead-{kind}")
        client = lab.host(f"cli{segment}", hostname=f"client-{kind}", dad=False)
        for host in (live, gone):
            lab.plug(host, "eth0", segment)
        lab.plug(client, "eth0", segment, up=False)
        live.link_local("eth0")
        gone.link_local("eth0")
        netns.start_our_server(live, work / f"live-{kind}", section, port=PORT,
                               extra=["--servicename", "Live"])
        netns.start_announcer(gone, work / f"dead-{kind}", "Dead", PORT)
        if kind == "hung":
            netns.start_silent_listener(gone, work / f"dead-{kind}", PORT)
        argv = {k: netns.client_command(k, keys, hooks, interface="eth0")
                for k in ("ours", "original")}
        dead.append(Scenario(f"one of two servers dead ({kind}), DAD off", client, argv,
                             timeout=args.dead_timeout, cap=args.dead_timeout))
    groups.append(dead)
    time.sleep(1.0)  # let the announcements settle
    return groups


def report(groups: list[list[Scenario]], args) -> None:
    print()
    print(f"machine: {netns.machine_summary()}")
    print(f"{'scenario':40} {'ours med':>9} {'p90':>7} {'orig med':>9} {'p90':>7} "
          f"{'ours/orig':>9} {'exit ours':>9} {'exit orig':>9}  fails o/O")
    def seconds(value: float, cap: float | None, width: int) -> str:
        if cap is not None and value >= cap:
            return f">={cap:g}".rjust(width)  # no success within the cap
        return f"{value:{width}.3f}"

    for group in groups:
        for scenario in group:
            ours, orig = scenario.times["ours"], scenario.times["original"]
            ratio = median(ours) / median(orig) if ours and orig else float("nan")
            bounded = scenario.cap is not None and median(orig) >= scenario.cap
            cap = scenario.cap
            print(f"{scenario.name:40} {seconds(median(ours), cap, 9)} "
                  f"{seconds(p90(ours), cap, 7)} {seconds(median(orig), cap, 9)} "
                  f"{seconds(p90(orig), cap, 7)} "
                  f"{('<=' if bounded else '  ') + format(ratio, '.2f'):>9} "
                  f"{median(scenario.exits['ours']):9.3f} "
                  f"{median(scenario.exits['original']):9.3f}  "
                  f"{scenario.failures['ours']}/{scenario.failures['original']}")
        print()
    print("seconds from starting mandos-client (interface down) to the complete passphrase "
          "on its stdout; 'exit' = to the process's end; ours/orig = ratio of medians.")
    print(f"dead-server rows: a run without success after {args.dead_timeout:g} s counts as "
          f"{args.dead_timeout:g} s ('fails' column: ours/original; '>=' marks such medians, "
          f"'exit' medians are of the successful runs only).")
    notes = [n for g in groups for s in g for n in s.notes]
    if notes:
        print("\nfailed runs (first 6):")
        for note in notes[:6]:
            print("  " + note.replace("\n", " | "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dead-rounds", type=int, default=8)
    parser.add_argument("--dead-timeout", type=float, default=25.0)
    parser.add_argument("--no-original-server", dest="original_server", action="store_false")
    parser.add_argument("--key-bits", type=int, default=None,
                        help="RSA key size (default: mandos-keygen's)")
    args = parser.parse_args()

    print(f"machine: {netns.machine_summary()}")
    print("scenario: network namespaces on a bridge; client interface down at start; "
          "our client = plugins.d/mandos-client, original = Debian mandos-client 1.8.16")
    try:
        lab = netns.Lab("bench")
    except netns.NetnsError as error:
        print(f"cannot run: {error}", file=sys.stderr)
        return 1
    with lab:
        work = lab.folder("mandos-bench-boot-")
        groups = build(lab, args, work)
        log = work / "client.log"
        first, reference, dead = groups
        started = time.monotonic()
        for number in range(args.rounds):
            order = ("ours", "original") if number % 2 == 0 else ("original", "ours")
            for scenario in first + reference:
                for kind in order:
                    scenario.run(kind, log)
            print(f"round {number + 1}/{args.rounds} done "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
        for number in range(args.dead_rounds):
            order = ("ours", "original") if number % 2 == 0 else ("original", "ours")
            for scenario in dead:
                for kind in order:
                    scenario.run(kind, log)
            print(f"dead-server round {number + 1}/{args.dead_rounds} done "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
        report(groups, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

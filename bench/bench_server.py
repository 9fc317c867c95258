#!/usr/bin/python3
"""Our Mandos server against the original (Debian 1.8.16), side by side, same load.

Part "throughput": one configured client; the load driver
(bench/load_driver.py: the Mandos protocol and TLS with the client's key,
nothing decrypted) unlocks for --duration seconds at each concurrency
level, against each server in turn (the order alternates between levels).
Prints unlocks/s, median and 99th percentile latency, server CPU per
unlock, and the ratios ours/original.

Part "clients": 1,000 configured clients (distinct Ed25519 key IDs, one
shared secret; the first is the load driver's key), ``checker = true``, with
the default checker interval (PT2M, timeout PT5M) and a quiet one (PT1H,
timeout PT2H).  For each server: start-up time (exec until the port accepts
a connection, and until a first unlock succeeds), the proportional set size
of the whole process tree and the number of descendant (checker) processes
after --settle seconds, and the median/p99 latency of --unlocks sequential
unlocks, compared with the same server knowing one client.

Both servers run in the foreground with --no-dbus --no-zeroconf --address
::1 --port P and the default log level (no --debug), each in a fresh
folder; nothing leaves loopback.  Nothing is asserted about timing.

Usage: /usr/bin/python3 bench/bench_server.py [--part throughput|clients]
           [--settle 120] [--duration 10] [--levels 1,10,50] [--clients 1000]
(as root; about 15 minutes with the defaults)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load_driver  # noqa: E402
import server_harness as harness  # noqa: E402

SECRET_SIZE = 1200  # bytes: about an OpenPGP message holding a passphrase
WARMUP_UNLOCKS = 20
SAMPLE_PERIOD = 5.0  # seconds between looks at the process tree while settling
BASELINE_SETTLE = 5.0  # seconds the one-client servers run before they are measured
# Settling ends early if the machine runs this low on memory (the original
# forks a copy of itself per checker, and they can pile up).
MIN_AVAILABLE = 1 << 30
VARIANTS = {
    "default": {"checker": "true"},
    "quiet": {"checker": "true", "interval": "PT1H", "timeout": "PT2H"},
}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- what else the machine is doing ----------------------------------------------------------

def _busy_cpu() -> float:
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in
               ("user", "nice", "system", "irq", "softirq", "steal"))


class LoadMeter:
    """CPU used on the machine by others than us and the servers being measured.

    "Others" is every process but this one (the load driver's threads) and
    the given servers' process trees; the result is in cores (1.0 = one
    core busy all the time).
    """

    def __init__(self, servers: list[harness.ServerProcess]) -> None:
        self.servers = servers
        self.me = psutil.Process()
        self.began = time.monotonic()
        self.busy = _busy_cpu()
        self.mine = self._mine()

    def _mine(self) -> float:
        times = self.me.cpu_times()
        return times.user + times.system + sum(s.cpu_seconds() for s in self.servers)

    def other_cores(self) -> float:
        elapsed = time.monotonic() - self.began
        others = (_busy_cpu() - self.busy) - (self._mine() - self.mine)
        return max(others, 0.0) / elapsed if elapsed > 0 else 0.0


# -- formatting ------------------------------------------------------------------------------

def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def ratio(ours: float | None, theirs: float | None) -> str:
    if not ours or not theirs:
        return "n/a"
    return f"{ours / theirs:.2f}"


def errors_text(result: dict) -> str:
    return "; ".join(f"{times} x {message}" for message, times in
                     sorted(result["errors"].items(), key=lambda item: -item[1]))


def latency_run(server: harness.ServerProcess, keys: harness.BenchKeys, count: int,
                budget: float) -> dict:
    """``count`` sequential unlocks (concurrency 1), at most ``budget`` seconds."""
    meter = LoadMeter([server])
    result = load_driver.run_load(harness.LOOPBACK, server.port, keys.keyfiles, 1,
                                  duration=budget, count=count)
    result["other_cores"] = meter.other_cores()
    return result


def stop(server: harness.ServerProcess, grace: float) -> str:
    took = server.stop(grace)
    return f"exited {took:.2f} s after SIGTERM" if took is not None else (
        f"killed after a {grace:g} s grace")


# -- part 1: throughput ----------------------------------------------------------------------

def part_throughput(args, work: Path, secret: bytes) -> None:
    keys = harness.make_keys(work / "keys-1", 1)
    conf = harness.clients_conf(keys.key_ids, secret, VARIANTS["default"])
    servers = [harness.OurServer(work / "tp-ours", conf, debuglevel=args.debuglevel),
               harness.OriginalServer(work / "tp-original", conf, debuglevel=args.debuglevel)]
    results: dict[tuple[int, str], dict] = {}
    try:
        for server in servers:
            server.folder.mkdir()
            server.start()
            server.first_unlock(keys.keyfiles)
            progress(f"throughput: {server.label} listening on port {server.port} "
                     f"({server.command_line()})")
            load_driver.run_load(harness.LOOPBACK, server.port, keys.keyfiles, 1,
                                 duration=30, count=WARMUP_UNLOCKS)
        for number, level in enumerate(args.levels):
            order = servers if number % 2 == 0 else servers[::-1]
            for server in order:
                progress(f"throughput: {server.label}, {level} concurrent, {args.duration:g} s")
                meter = LoadMeter(servers)
                cpu = server.cpu_seconds()
                result = load_driver.run_load(harness.LOOPBACK, server.port, keys.keyfiles,
                                              level, duration=args.duration)
                result["cpu_s"] = server.cpu_seconds() - cpu
                result["other_cores"] = meter.other_cores()
                results[level, server.label] = result
        idle = {server.label: server.sample(with_pss=True) for server in servers}
    finally:
        stopped = {server.label: stop(server, 30.0) for server in servers}

    print()
    print(f"== Part 1: throughput, 1 client, checker = true, load driver "
          f"{args.duration:g} s per level ==")
    print(f"{'conc':>4} {'server':9} {'unlocks':>7} {'unl/s':>7} {'median':>8} {'p99':>8} "
          f"{'fail':>5} {'CPU ms/unl':>10} {'other load':>10}")
    for level in args.levels:
        for label in ("ours", "original"):
            r = results[level, label]
            cpu_per = r["cpu_s"] * 1000 / r["unlocks"] if r["unlocks"] else None
            print(f"{level:4d} {label:9} {r['unlocks']:7d} {r['unlocks_per_s']:7.1f} "
                  f"{ms(r['median_ms']):>8} {ms(r['p99_ms']):>8} {r['failures']:5d} "
                  f"{ms(cpu_per):>10} {r['other_cores']:9.2f}c")
            if r["errors"]:
                print(f"{'':15}errors: {errors_text(r)}")
    print("latencies in ms, from connect to close_notify; CPU = server process tree incl.\n"
          "reaped children; other load = CPU of all other processes on the machine, in cores")
    for level in args.levels:
        ours, theirs = results[level, "ours"], results[level, "original"]
        target = "   (target >= 4)" if level == max(args.levels) else ""
        print(f"ratio ours/original unlocks/s at {level:3d} concurrent: "
              f"{ratio(ours['unlocks_per_s'], theirs['unlocks_per_s'])}{target}; "
              f"median latency ours/original: {ratio(ours['median_ms'], theirs['median_ms'])}")
    for label, sample in idle.items():
        print(f"{label}: PSS after the load {sample.pss_bytes / 2**20:.1f} MiB in "
              f"{sample.processes} process(es); {stopped[label]}")


# -- part 2: many clients --------------------------------------------------------------------

def run_many(cls, folder: Path, conf: str, keys: harness.BenchKeys, settle: float,
             args) -> dict:
    """Start, settle, measure, unlock sequentially, stop; the numbers as a dict."""
    server = cls(folder, conf, debuglevel=args.debuglevel)
    folder.mkdir()
    row: dict = {"label": server.label}
    try:
        row["startup_s"] = server.start()
        # A server that never serves must not stretch the settling time much.
        row["first_unlock_s"] = server.first_unlock(
            keys.keyfiles, timeout=max(settle - row["startup_s"], 10.0))
        row["command"] = server.command_line()
        first = row["first_unlock_s"]
        progress(f"{folder.name}: listening after {row['startup_s']:.2f} s, first unlock "
                 f"{'never' if first is None else f'after {first:.2f} s'}; "
                 f"settling until {settle:g} s")
        meter = LoadMeter([server])
        peak = zombies_peak = 0
        end = server.process_started + settle
        while True:
            left = end - time.monotonic()
            if left <= 0 or not server.alive():
                break
            time.sleep(min(SAMPLE_PERIOD, left))
            sample = server.sample()
            peak = max(peak, sample.descendants)
            zombies_peak = max(zombies_peak, sample.zombies)
            if psutil.virtual_memory().available < MIN_AVAILABLE:
                progress(f"{folder.name}: less than {MIN_AVAILABLE >> 20} MiB of memory "
                         "left; measuring now")
                row["cut_short"] = True
                break
        # Both count from exec: the tree started from nothing.
        since = time.monotonic() - server.process_started
        row["settle_cpu_s"] = server.cpu_seconds()
        row["settle_write_mb_s"] = server.write_bytes() / 1e6 / since
        row["settle_other_cores"] = meter.other_cores()
        final = server.sample(with_pss=True)
        row.update(pss_mib=final.pss_bytes / 2**20, processes=final.processes,
                   descendants=final.descendants, zombies=final.zombies, names=final.names,
                   peak_descendants=max(peak, final.descendants),
                   peak_zombies=max(zombies_peak, final.zombies),
                   measured_at_s=time.monotonic() - server.process_started)
        progress(f"{folder.name}: PSS {row['pss_mib']:.1f} MiB, {final.descendants} "
                 f"descendants; {args.unlocks} sequential unlocks")
        row["latency"] = latency_run(server, keys, args.unlocks, args.latency_budget)
        row["alive"] = server.alive()
    finally:
        grace = 60.0 if server.label == "ours" else args.original_grace
        row["stopped"] = stop(server, grace)
        progress(f"{folder.name}: {row['stopped']}")
    return row


def part_clients(args, work: Path, secret: bytes) -> None:
    began = time.monotonic()
    keys = harness.make_keys(work / f"keys-{args.clients}", args.clients)
    progress(f"clients: made {args.clients} keys in {time.monotonic() - began:.2f} s")
    classes = (harness.OurServer, harness.OriginalServer)

    baseline = {}
    conf_one = harness.clients_conf(keys.key_ids[:1], secret, VARIANTS["default"])
    for cls in classes:
        baseline[cls.label] = run_many(cls, work / f"one-{cls.label}", conf_one, keys,
                                       BASELINE_SETTLE, args)
    rows: dict[tuple[str, str], dict] = {}
    for number, (variant, defaults) in enumerate(VARIANTS.items()):
        conf = harness.clients_conf(keys.key_ids, secret, defaults)
        order = classes if number % 2 == 0 else classes[::-1]
        for cls in order:
            rows[variant, cls.label] = run_many(cls, work / f"{variant}-{cls.label}", conf,
                                                keys, args.settle, args)

    print()
    print(f"== Part 2: {args.clients} clients (checker = true), measured after "
          f"{args.settle:g} s; 1 client measured after {BASELINE_SETTLE:g} s ==")
    print(f"{'case':14} {'server':8} {'listen s':>8} {'1st unl s':>9} {'at s':>4} "
          f"{'PSS MiB':>8} {'procs':>5} {'desc':>5} {'peak':>5} {'CPU s':>6} {'wr MB/s':>7} "
          f"{'other':>6} {'median':>8} {'p99':>8} {'unl':>4} {'fail':>4} {'other':>6}")

    def line(case: str, row: dict) -> None:
        lat = row["latency"]
        first = row["first_unlock_s"]
        print(f"{case:14} {row['label']:8} {row['startup_s']:8.3f} "
              f"{'-' if first is None else f'{first:.3f}':>9} {row['measured_at_s']:4.0f} "
              f"{row['pss_mib']:8.1f} "
              f"{row['processes']:5d} {row['descendants']:5d} {row['peak_descendants']:5d} "
              f"{row['settle_cpu_s']:6.1f} {row['settle_write_mb_s']:7.2f} "
              f"{row['settle_other_cores']:5.2f}c "
              f"{ms(lat['median_ms']):>8} {ms(lat['p99_ms']):>8} {lat['unlocks']:4d} "
              f"{lat['failures']:4d} {lat['other_cores']:5.2f}c")
        if row["peak_zombies"]:
            print(f"{'':24}up to {row['peak_zombies']} zombie descendants seen while settling")
        if row.get("cut_short"):
            print(f"{'':24}settling cut short: the machine ran low on memory")
        if lat["errors"]:
            print(f"{'':24}errors: {errors_text(lat)}")
        if row["names"]:
            names = ", ".join(f"{n} x {name}" for name, n in sorted(row["names"].items()))
            print(f"{'':24}descendants at the end: {names}")

    for label in ("ours", "original"):
        line("1 client", baseline[label])
    for variant, defaults in VARIANTS.items():
        settings = ", ".join(f"{k}={v}" for k, v in defaults.items() if k != "checker")
        case = f"{args.clients} {variant}"
        for label in ("ours", "original"):
            line(case, rows[variant, label])
        print(f"{'':24}({settings or 'interval=PT2M, timeout=PT5M (defaults)'})")
    print(f"""\
listen   = exec until the port accepts a connection; 1st unl = exec until an unlock succeeded
at       = seconds from exec when PSS and processes were measured
procs    = processes in the tree then; desc = descendants alive then (checkers, and the
           original's per-connection and per-checker processes); peak = most descendants
           seen while settling (sampled every {SAMPLE_PERIOD:g} s)
CPU s    = CPU time of the server tree from exec until then (reaped children included)
wr MB/s  = what the living tree wrote to storage from exec until then, per second
other    = CPU of all other processes on the machine, in cores, while settling / unlocking
median, p99 = ms per unlock, sequential; unl/fail = unlocks / failed attempts""")
    print()
    for variant in VARIANTS:
        ours, theirs = rows[variant, "ours"], rows[variant, "original"]
        print(f"{variant}: start-up (listen) ours/original "
              f"{ratio(ours['startup_s'], theirs['startup_s'])} (target <= 0.1); "
              f"to first unlock {ratio(ours['first_unlock_s'], theirs['first_unlock_s'])}")
        print(f"{variant}: PSS ours/original {ratio(ours['pss_mib'], theirs['pss_mib'])} "
              f"(target <= 0.5)")
        for label in ("ours", "original"):
            row, one = rows[variant, label], baseline[label]
            target = " (target <= 1.2)" if label == "ours" else ""
            print(f"{variant}: {label} latency {args.clients} clients / 1 client: median "
                  f"{ratio(row['latency']['median_ms'], one['latency']['median_ms'])}"
                  f"{target}, p99 {ratio(row['latency']['p99_ms'], one['latency']['p99_ms'])}")
    print("stopping: " + "; ".join(
        f"{case}/{row['label']} {row['stopped']}" for case, row in
        [("1 client", baseline["ours"]), ("1 client", baseline["original"])]
        + [(variant, rows[variant, label]) for variant in VARIANTS
           for label in ("ours", "original")]))


# -- main ------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("throughput", "clients", "all"), default="all")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of load per concurrency level (default 10)")
    parser.add_argument("--levels", default="1,10,50",
                        help="concurrency levels, comma-separated (default 1,10,50)")
    parser.add_argument("--clients", type=int, default=1000,
                        help="configured clients in part 2 (default 1000)")
    parser.add_argument("--settle", type=float, default=120.0,
                        help="seconds from exec until PSS and processes are measured "
                        "(default 120)")
    parser.add_argument("--unlocks", type=int, default=100,
                        help="sequential unlocks for the latency of part 2 (default 100)")
    parser.add_argument("--latency-budget", type=float, default=90.0,
                        help="at most this many seconds for those unlocks (default 90)")
    parser.add_argument("--original-grace", type=float, default=5.0,
                        help="seconds the original gets to exit after SIGTERM in part 2 "
                        "before it is killed (a clean exit with 1000 clients takes ~80 s; "
                        "default 5)")
    parser.add_argument("--debuglevel", default=None,
                        help="--debuglevel for both servers (default: none, i.e. WARNING)")
    args = parser.parse_args()
    try:
        args.levels = [int(n) for n in args.levels.split(",")]
    except ValueError:
        parser.error("--levels takes numbers separated by commas")
    if os.geteuid() != 0:
        parser.error("run as root: both servers drop privileges and read other processes' PSS")
    if args.clients < 1 or args.unlocks < 1 or min(args.levels) < 1:
        parser.error("--clients, --unlocks and --levels must be positive")

    harness.peers.unpacked_root()  # fetch the original before any clock starts
    load_start = os.getloadavg()
    print(f"Mandos server benchmark: ours ({harness.OUR_SERVER}) vs original "
          f"(Debian mandos {harness.peers.PEER_VERSION}, {harness.peers.unpacked_root()})")
    print(f"machine: {os.cpu_count()} cores; Python {sys.version.split()[0]} "
          f"({sys.executable}); load average at start "
          f"{' '.join(f'{x:.2f}' for x in load_start)}")
    print(f"both servers: <server> --foreground --no-dbus --no-zeroconf --address ::1 --port P "
          f"--configdir DIR/config --statedir DIR/state"
          f"{' --debuglevel ' + args.debuglevel if args.debuglevel else ''}; "
          f"TMPDIR=DIR/tmp; empty mandos.conf")
    print("  ours:     bin/mandos ... (#!/usr/bin/python3 -I)")
    print("  original: /usr/bin/python3 .../usr/sbin/mandos ... with DBUS_SYSTEM_BUS_ADDRESS "
          "of a private system bus (it connects even with --no-dbus)")
    print(f"clients.conf: [DEFAULT] checker = true (+ interval/timeout per variant), one "
          f"shared {SECRET_SIZE}-byte secret; per client key_id, fingerprint, host")
    print(f"load driver: bench/load_driver.py run_load, TLS 1.3 raw public keys (Ed25519), "
          f"no decryption, per-attempt timeout {load_driver.ATTEMPT_TIMEOUT:g} s; "
          f"levels {args.levels}, {args.duration:g} s each; part 2: {args.clients} clients, "
          f"settle {args.settle:g} s, {args.unlocks} sequential unlocks "
          f"(budget {args.latency_budget:g} s); original's exit grace {args.original_grace:g} s")
    sys.stdout.flush()

    secret = os.urandom(SECRET_SIZE)
    work = harness.world_temp("mandos-bench-server-")
    keeper = harness.SyslogKeeper()
    began = time.monotonic()
    try:
        with keeper:
            if args.part in ("throughput", "all"):
                part_throughput(args, work, secret)
            if args.part in ("clients", "all"):
                part_clients(args, work, secret)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"took {time.monotonic() - began:.0f} s; /dev/log listener bound by this "
          f"benchmark {keeper.rebinds} time(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

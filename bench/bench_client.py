#!/usr/bin/python3
"""Time to passphrase: our mandos-client against the original, side by side.

Both clients unlock from the same original Debian mandos server (1.8.16) on
loopback, with the same keys (made by the original mandos-keygen), alone
and through a plugin-runner (ours with ours, the original with the
original).  Runs alternate between the contenders so that machine noise
hits all alike.  Prints medians, 90th percentiles and the ratios.

Usage: /usr/bin/python3 bench/bench_client.py [--rounds N]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import peers  # noqa: E402
from original_server import (OriginalServer, clients_conf_section,  # noqa: E402
                             make_world_temp, original_keygen, remove)

PASSWORD = b"benchmark passphrase"


def client_options(keys: Path, address: str) -> list[str]:
    return ["--connect", address, "--interface", "none",
            "--pubkey", str(keys / "pubkey.txt"), "--seckey", str(keys / "seckey.txt"),
            "--tls-pubkey", str(keys / "tls-pubkey.pem"),
            "--tls-privkey", str(keys / "tls-privkey.pem")]


def runner_command(runner: Path, plugin_dir: Path, options: list[str], work: Path) -> list[str]:
    return [str(runner), "", "--plugin-dir", str(plugin_dir),
            "--config-file", str(work / "no-such-file"),
            "--options-for", "mandos-client:" + ",".join(options)]


def plugin_dir_with(work: Path, name: str, client: Path, copy: bool) -> Path:
    """A plugin directory holding only mandos-client.

    The original binary is copied with its set-user-ID bit (its own
    plugins.d is 0700, closed to the plugin user); our launcher is linked,
    since it finds its package next to its real path.
    """
    folder = work / name
    folder.mkdir()
    if copy:
        shutil.copy2(client, folder / "mandos-client")
    else:
        os.symlink(client, folder / "mandos-client")
    os.chmod(folder, 0o755)
    return folder


def time_once(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=60)
    elapsed = time.perf_counter() - start
    if result.stdout != PASSWORD:
        raise RuntimeError(f"{command[0]} failed (exit {result.returncode}): "
                           f"{result.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    work = make_world_temp("mandos-bench-")
    try:
        keys = work / "keys"
        keys.mkdir()
        original_keygen(keys, "--force")
        for key in keys.iterdir():  # plugin runners drop to uid 65534
            os.chown(key, 65534, 65534)
        passfile = work / "passfile"
        passfile.write_bytes(PASSWORD)
        section = original_keygen(keys, "--passfile", str(passfile), "--no-ssh").stdout

        original_libdir = peers.client_libdir()
        ours = {"client": REPO / "plugins.d" / "mandos-client",
                "runner": REPO / "bin" / "plugin-runner"}
        theirs = {"client": original_libdir / "plugins.d" / "mandos-client",
                  "runner": original_libdir / "plugin-runner"}
        our_plugins = plugin_dir_with(work, "ours.d", ours["client"], copy=False)
        their_plugins = plugin_dir_with(work, "theirs.d", theirs["client"], copy=True)

        server_dir = work / "server"
        server_dir.mkdir()
        os.chmod(server_dir, 0o755)
        with OriginalServer(server_dir, clients_conf_section("bench", section)) as server:
            options = client_options(keys, server.address)
            contenders = {
                "our client": [str(ours["client"]), *options],
                "original client": [str(theirs["client"]), *options],
                "our runner + our client": runner_command(ours["runner"], our_plugins,
                                                          options, work),
                "original runner + original client": runner_command(
                    theirs["runner"], their_plugins, options, work),
            }
            for command in contenders.values():  # warm caches, check all work
                time_once(command)
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.rounds):
                for name, command in contenders.items():
                    times[name].append(time_once(command))
    finally:
        remove(work)
        shutil.rmtree(work, ignore_errors=True)

    print(f"mandos-client time to passphrase, original server on loopback; "
          f"{args.rounds} rounds, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"{'':36} {'median ms':>10} {'p90 ms':>8}")
    medians = {}
    for name, values in times.items():
        values.sort()
        medians[name] = statistics.median(values)
        p90 = values[int(0.9 * (len(values) - 1))]
        print(f"{name:36} {medians[name] * 1000:10.1f} {p90 * 1000:8.1f}")
    print()
    print(f"ratio our/original client:                  "
          f"{medians['our client'] / medians['original client']:.2f}")
    print(f"ratio our/original (through plugin-runner): "
          f"{medians['our runner + our client'] / medians['original runner + original client']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""Start-up and added latency of our plugin-runner against Debian's original.

Both runners run the same trivial plugin (a copy of /bin/true, and a
``#!/bin/sh`` plugin that prints a password).  All commands are run in
interleaved rounds (the order rotates every round) so that noise spreads
evenly; each run is timed from posix_spawn to waitpid, with its standard
output read to the end through a pipe.  No assertion is made on timing; the
output of every run is checked so that a broken set-up cannot pass for a
fast one.

Run from the repository: ``/usr/bin/python3 bench/bench_plugin_runner.py``
(``--rounds N``, ``--warmup N``).  Run it as root to measure what happens at
boot (the runners then drop to uid 65534 before reading the plugins).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUR_RUNNER = REPO / "bin" / "plugin-runner"
INTERPRETER = "/usr/bin/python3"  # the #! interpreter of bin/plugin-runner
PASSWORD = b"correct horse battery staple"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def load_peers():
    spec = importlib.util.spec_from_file_location("peers", REPO / "tests" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_run(argv: list[str]) -> tuple[int, bytes, int]:
    """Run argv; return (elapsed ns, stdout, exit status)."""
    read_fd, write_fd = os.pipe()
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, write_fd, 1),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_CLOSE, read_fd),
        (os.POSIX_SPAWN_CLOSE, write_fd),
    ]
    start = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, ENV, file_actions=actions)
    os.close(write_fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter_ns() - start
    os.close(read_fd)
    return elapsed, b"".join(chunks), os.waitstatus_to_exitcode(status)


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = min(max(math.ceil(fraction * len(sorted_values)), 1), len(sorted_values))
    return sorted_values[rank - 1]


def median(sorted_values: list[int]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else (sorted_values[mid - 1] + sorted_values[mid]) / 2


def make_plugins(root: Path) -> dict[str, Path]:
    """Two plugin directories readable by uid 65534: {kind: directory}."""
    dirs = {}
    for kind in ("true", "sh"):
        directory = root / f"plugins-{kind}"
        directory.mkdir(mode=0o755)
        plugin = directory / kind
        if kind == "true":
            shutil.copyfile("/bin/true", plugin)
        else:
            plugin.write_bytes(b"#!/bin/sh\nprintf '%s' '" + PASSWORD + b"'\n")
        plugin.chmod(0o755)
        dirs[kind] = directory
    return dirs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()

    peers = load_peers()
    original = str(peers.original_plugin_runner())
    root = Path(tempfile.mkdtemp(prefix="bench-plugin-runner-"))
    try:
        root.chmod(0o755)
        dirs = make_plugins(root)
        no_config = f"--config-file={root}/no-such-file"
        # label -> (argv, expected stdout)
        commands: dict[str, tuple[list[str], bytes | None]] = {
            "bare": ([INTERPRETER, "-I", "-S", "-c", "pass"], b""),
            "ours --version": ([str(OUR_RUNNER), "--version"], None),
            "original --version": ([original, "--version"], None),
        }
        for kind, directory in dirs.items():
            expected = b"" if kind == "true" else PASSWORD
            commands[f"plugin {kind}"] = ([str(directory / kind)], expected)
            for name, program in (("original", original), ("ours", str(OUR_RUNNER))):
                commands[f"{name} {kind}"] = (
                    [program, no_config, f"--plugin-dir={directory}"], expected)

        labels = list(commands)
        samples: dict[str, list[int]] = {label: [] for label in labels}
        for round_number in range(args.warmup + args.rounds):
            offset = round_number % len(labels)
            for label in labels[offset:] + labels[:offset]:
                argv, expected = commands[label]
                elapsed, stdout, status = timed_run(argv)
                if status != 0 or (expected is not None and stdout != expected) \
                        or (expected is None and not stdout):
                    print(f"{label}: unexpected result: status {status}, stdout {stdout!r}",
                          file=sys.stderr)
                    return 1
                if round_number >= args.warmup:
                    samples[label].append(elapsed)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    stats = {}
    for label, values in samples.items():
        values.sort()
        stats[label] = (median(values) / 1e6, percentile(values, 0.9) / 1e6)

    interpreter_version = subprocess.run(
        [INTERPRETER, "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True).stdout.strip()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"plugin-runner start-up: {args.rounds} interleaved rounds "
          f"(+{args.warmup} warm-up), wall time per run, posix_spawn to waitpid")
    print(f"cores: {os.cpu_count()} (usable: {affinity}); "
          f"harness Python {platform.python_version()}; "
          f"{INTERPRETER} {interpreter_version}; kernel {platform.release()}; "
          f"uid {os.getuid()}")
    print(f"original: {original} (mandos-client {peers.PEER_VERSION})")
    print(f"ours:     {OUR_RUNNER}")
    print()
    rows = [
        ("bare interpreter: python3 -I -S -c pass", "bare"),
        ("plugin alone: copy of /bin/true", "plugin true"),
        ("original runner + true", "original true"),
        ("our runner + true", "ours true"),
        ("plugin alone: #!/bin/sh printf", "plugin sh"),
        ("original runner + sh", "original sh"),
        ("our runner + sh", "ours sh"),
        ("original runner --version", "original --version"),
        ("our runner --version", "ours --version"),
    ]
    width = max(len(text) for text, _ in rows)
    print(f"{'command':<{width}}  {'median ms':>9}  {'p90 ms':>8}")
    for text, label in rows:
        med, p90 = stats[label]
        print(f"{text:<{width}}  {med:9.2f}  {p90:8.2f}")

    bare = stats["bare"][0]
    print()
    print(f"{'ratios of medians':<{width}}  {'true':>9}  {'sh':>8}")

    def row(text, fn, fmt="{:9.2f}"):
        values = [fn(kind) for kind in ("true", "sh")]
        print(f"{text:<{width}}  {fmt.format(values[0]):>9}  {fmt.format(values[1]):>8}")

    def own(name, kind):
        return stats[f"{name} {kind}"][0] - stats[f"plugin {kind}"][0]

    row("ours / original", lambda k: stats[f"ours {k}"][0] / stats[f"original {k}"][0])
    row("ours / bare interpreter", lambda k: stats[f"ours {k}"][0] / bare)
    row("original's own cost (ms)", lambda k: own("original", k))
    row("our own cost (ms)", lambda k: own("ours", k))
    row("our own cost / bare interpreter", lambda k: own("ours", k) / bare)
    print("(runner's own cost = runner + plugin - plugin alone; "
          "target for our own cost / bare interpreter: <= 2.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

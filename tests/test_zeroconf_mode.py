"""Tests for the scheduling of attempts in Zeroconf mode (CLIENT.md §2.9, improved).

No network: ``try_server`` is a fake whose servers answer, fail or hang as
each test says, and which records when each attempt started and ended.
"""

from __future__ import annotations

import queue
import signal
import socket
import threading
import time
from typing import Callable

import pytest

from mandos.client import zeroconf_mode
from mandos.client.servers import ServerAddress
from mandos.client.zeroconf_mode import AttemptScheduler

A = ServerAddress("fe80::a", 4711, socket.AF_INET6, 2)
B = ServerAddress("fe80::b", 4711, socket.AF_INET6, 2)
C = ServerAddress("10.0.0.3", 4711, socket.AF_INET, 3)

Behaviour = Callable[[int], "bytes | None"]  # attempt number (1, 2, ...) -> outcome


def fails(_try: int) -> None:
    return None


def succeeds(password: bytes, after: float = 0.0) -> Behaviour:
    def behaviour(_try: int) -> bytes:
        time.sleep(after)
        return password
    return behaviour


def fails_then_succeeds(failures: int, password: bytes = b"secret") -> Behaviour:
    return lambda number: password if number > failures else None


def hangs(seconds: float, outcome: bytes | None = None) -> Behaviour:
    """A dead server: the attempt blocks on its connection until its own timeout.

    The connection is registered with the scheduler, as the real attempt's
    is, so abandoning the attempt ends the wait at once.
    """
    def behaviour(_try: int) -> bytes | None:
        ours, theirs = socket.socketpair()
        with ours, theirs, zeroconf_mode.track(ours):
            ours.settimeout(seconds)
            try:
                ours.recv(1)
            except socket.timeout:
                pass
        return outcome
    return behaviour


class FakeServers:
    """``try_server`` for the tests: per-server behaviour, and a log of attempts."""

    def __init__(self, **behaviours: Behaviour) -> None:
        self.behaviours = {self.name(s): b for s, b in
                           ((globals()[key], value) for key, value in behaviours.items())}
        self.attempts: list[tuple[str, float, float, bool]] = []  # name, start, end, abandoned
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0

    @staticmethod
    def name(server: ServerAddress) -> str:
        return {A.address: "A", B.address: "B", C.address: "C"}.get(server.address,
                                                                    server.address)

    def tries(self, name: str) -> list[tuple[float, float]]:
        return [(start, end) for n, start, end, _ in self.attempts if n == name]

    def __call__(self, server: ServerAddress) -> bytes | None:
        name = self.name(server)
        with self.lock:
            number = len(self.tries(name)) + 1
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        start = time.monotonic()
        try:
            return self.behaviours[name](number)
        finally:
            with self.lock:
                self.active -= 1
                self.attempts.append((name, start, time.monotonic(),
                                      zeroconf_mode.abandoned()))


def run_in_thread(scheduler: AttemptScheduler, **kwargs) -> tuple[threading.Thread, dict]:
    """Run the scheduler on a thread; the outcome lands in the returned dict."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = scheduler.run(**kwargs)
        except BaseException as error:  # noqa: BLE001
            outcome["error"] = error
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def timed_run(scheduler: AttemptScheduler, *servers: ServerAddress,
              **kwargs) -> tuple[bytes | None, float]:
    for server in servers:
        scheduler.add(server)
    start = time.monotonic()
    result = scheduler.run(**kwargs)
    return result, time.monotonic() - start


# --------------------------------------------------------------------------

def test_new_servers_are_tried_concurrently():
    fake = FakeServers(A=hangs(0.4), B=succeeds(b"B", after=0.4))
    with AttemptScheduler(fake, retry=10) as scheduler:
        result, elapsed = timed_run(scheduler, A, B)
    assert result == b"B"
    assert elapsed < 0.6  # one attempt's time, not two
    starts = [start for _name, start, _end, _ in fake.attempts]
    assert max(starts) - min(starts) < 0.1


def test_first_success_wins_and_the_rest_are_abandoned():
    fake = FakeServers(A=succeeds(b"from A", after=0.1), B=hangs(5, outcome=b"from B"))
    finished: list[bytes] = []

    def finish(data: bytes) -> bytes:
        finished.append(data)
        return data

    with AttemptScheduler(fake, retry=10, finish=finish) as scheduler:
        result, _elapsed = timed_run(scheduler, A, B)
    assert result == b"from A"
    # B's attempt was abandoned: it ended at once and its password went nowhere.
    assert fake.tries("B") and fake.tries("B")[0][1] - fake.tries("B")[0][0] < 1
    assert [abandoned for name, *_, abandoned in fake.attempts if name == "B"] == [True]
    assert finished == [b"from A"]


def test_a_failed_server_is_tried_again_every_retry_seconds():
    fake = FakeServers(A=fails_then_succeeds(4))
    with AttemptScheduler(fake, retry=0.2) as scheduler:
        result, elapsed = timed_run(scheduler, A)
    assert result == b"secret"
    starts = [start for start, _end in fake.tries("A")]
    assert len(starts) == 5
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    assert all(0.19 <= gap < 0.3 for gap in gaps), gaps
    assert 0.8 <= elapsed < 1.1


def test_each_server_keeps_its_own_retry_clock():
    fake = FakeServers(A=fails, B=fails)
    scheduler = AttemptScheduler(fake, retry=0.3)
    scheduler.add(A)
    thread, outcome = run_in_thread(scheduler, should_stop=lambda: len(fake.attempts) >= 6)
    time.sleep(0.15)
    scheduler.add(B)
    thread.join(5)
    scheduler.close()
    a, b = [s for s, _e in fake.tries("A")], [s for s, _e in fake.tries("B")]
    assert len(a) >= 3 and len(b) >= 2
    assert all(0.29 <= y - x < 0.4 for x, y in zip(a, a[1:]))
    assert all(0.29 <= y - x < 0.4 for x, y in zip(b, b[1:]))
    assert 0.1 <= b[0] - a[0] < 0.25  # B tried when found, not on A's schedule


def test_never_gives_up_until_success():
    fake = FakeServers(A=fails_then_succeeds(40, b"at last"))
    with AttemptScheduler(fake, retry=0.005) as scheduler:
        result, _elapsed = timed_run(scheduler, A)
    assert result == b"at last"
    assert len(fake.tries("A")) == 41


def test_the_same_server_found_twice_is_tried_once():
    fake = FakeServers(A=fails, B=fails)
    same_a = ServerAddress("fe80:0::000a", A.port, A.family, A.ifindex)  # same, written otherwise
    other_port = ServerAddress(A.address, 4712, A.family, A.ifindex)
    other_interface = ServerAddress(A.address, A.port, A.family, 3)
    deadline = time.monotonic() + 0.4
    with AttemptScheduler(fake, retry=10) as scheduler:
        for server in (A, A, same_a, B, A, other_port, other_interface):
            scheduler.add(server)
        scheduler.run(should_stop=lambda: time.monotonic() > deadline)
    assert len(fake.tries("A")) == 3  # A, A on port 4712, A on interface 3
    assert len(fake.tries("B")) == 1


def test_a_server_found_later_is_tried_as_soon_as_it_is_found():
    fake = FakeServers(A=fails, B=succeeds(b"B"))
    scheduler = AttemptScheduler(fake, retry=10)
    scheduler.add(A)
    thread, outcome = run_in_thread(scheduler)
    time.sleep(0.3)
    found = time.monotonic()
    scheduler.add(B)
    thread.join(5)
    scheduler.close()
    assert outcome["result"] == b"B"
    assert fake.tries("B")[0][0] - found < 0.05


def test_servers_from_a_queue_and_from_a_blocking_iterable_are_tried():
    fake = FakeServers(A=fails, B=succeeds(b"B"))
    found: queue.SimpleQueue[ServerAddress] = queue.SimpleQueue()
    found.put(A)
    threading.Timer(0.2, found.put, (B,)).start()
    assert zeroconf_mode.run(found, fake, 10, lambda: False) == b"B"

    def slowly():
        yield A
        time.sleep(0.2)
        yield B

    fake = FakeServers(A=fails, B=succeeds(b"B again"))
    assert zeroconf_mode.run(slowly(), fake, 10, lambda: False) == b"B again"


def test_should_stop_ends_everything_within_a_tenth_of_a_second():
    fake = FakeServers(A=hangs(30), B=hangs(30))
    stop = threading.Event()
    scheduler = AttemptScheduler(fake, retry=10)
    for server in (A, B):
        scheduler.add(server)
    thread, outcome = run_in_thread(scheduler, should_stop=stop.is_set)
    time.sleep(0.3)
    stopped = time.monotonic()
    stop.set()
    thread.join(5)
    assert outcome["ended"] - stopped < 0.1
    assert outcome["result"] is None
    assert scheduler.close(1.0)  # the hanging attempt was woken up
    assert time.monotonic() - stopped < 0.3
    assert all(end - stopped < 0.3 for _name, _start, end, _ in fake.attempts)


def test_a_signal_in_the_calling_thread_ends_everything_promptly():
    class Terminated(BaseException):
        pass

    def handler(signum, frame):
        raise Terminated()

    fake = FakeServers(A=hangs(30))
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        with AttemptScheduler(fake, retry=10) as scheduler:
            scheduler.add(A)
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            start = time.monotonic()
            with pytest.raises(Terminated):
                scheduler.run()
            assert time.monotonic() - start < 0.3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert [abandoned for *_, abandoned in fake.attempts] == [True]


def test_what_try_server_raises_is_raised_by_run():
    class SetupFailed(Exception):
        pass

    def broken(_try: int) -> None:
        raise SetupFailed("the OpenPGP process died")

    fake = FakeServers(A=hangs(30), B=broken)
    with AttemptScheduler(fake, retry=10) as scheduler:
        with pytest.raises(SetupFailed):
            timed_run(scheduler, A, B)
    assert [abandoned for name, *_, abandoned in fake.attempts if name == "A"] == [True]


def test_a_dead_server_does_not_delay_a_live_one():
    fake = FakeServers(A=hangs(5), B=succeeds(b"B", after=0.05))
    with AttemptScheduler(fake, retry=10) as scheduler:
        result, elapsed = timed_run(scheduler, A, B)
    assert result == b"B" and elapsed < 0.2


def test_attempts_at_once_are_bounded():
    fake = FakeServers(A=hangs(0.3), B=hangs(0.3), C=succeeds(b"C", after=0.1))
    with AttemptScheduler(fake, retry=10, max_concurrent=2) as scheduler:
        result, elapsed = timed_run(scheduler, A, B, C)
    assert result == b"C"
    assert fake.most_active == 2
    assert 0.4 <= elapsed < 0.6  # C waited for a free worker


def test_a_new_server_goes_before_retries_when_workers_are_busy():
    fake = FakeServers(A=fails, B=fails, C=hangs(0.3))
    scheduler = AttemptScheduler(fake, retry=0.1, max_concurrent=1)
    scheduler.add(A)
    thread, outcome = run_in_thread(scheduler, should_stop=lambda: len(fake.tries("B")) > 0)
    time.sleep(0.02)
    scheduler.add(C)  # keeps the only worker busy while A's retry falls due
    time.sleep(0.18)
    scheduler.add(B)
    thread.join(5)
    scheduler.close()
    assert len(fake.tries("A")) == 1  # B, found later than A's retry was due, went first


def test_finish_is_never_called_twice_at_once():
    calls: list[tuple[float, float]] = []

    def finish(data: bytes) -> bytes | None:
        start = time.monotonic()
        time.sleep(0.1)
        calls.append((start, time.monotonic()))
        return data if data == b"good" else None  # A's data does not decrypt

    fake = FakeServers(A=succeeds(b"bad"), B=succeeds(b"good", after=0.01))
    with AttemptScheduler(fake, retry=10, finish=finish) as scheduler:
        result, _elapsed = timed_run(scheduler, A, B)
    assert result == b"good"
    assert len(calls) == 2
    (_s1, e1), (s2, _e2) = sorted(calls)
    assert s2 >= e1


def test_outside_an_attempt_abandoned_and_track_do_nothing():
    assert not zeroconf_mode.abandoned()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with zeroconf_mode.track(ours) as tracked:
            assert tracked is ours
        theirs.sendall(b"x")
        assert ours.recv(1) == b"x"


# --------------------------------------------------------------------------
# Real attempts (the wire protocol and GnuTLS of mandos.client.attempt) over
# socket pairs: no network address is involved.

@pytest.fixture(scope="module")
def tls_credentials():
    from mandos import gnutls, keys

    public, private = keys.generate_tls_keypair()
    credentials = gnutls.RawPublicKeyCredentials(public, bytes(private))
    yield credentials
    credentials.close()


def test_real_attempts_run_concurrently_and_the_losers_end_at_once(tls_credentials):
    """A server that shook hands and then waits (for approval, say) does not
    hold up one that answers; abandoned, its attempt ends at once."""
    from fake_server import Connection, send_secret, stall_after_handshake

    from mandos import gnutls
    from mandos.client import attempt

    class Peer:  # what a fake server's Connection needs of its server
        credentials = gnutls.CertificateCredentials()
        stopping = threading.Event()

    scenarios = {A.address: stall_after_handshake, B.address: send_secret(b"sealed secret")}
    ended: dict[str, float] = {}

    def serve(scenario, connection: Connection) -> None:
        try:
            scenario(connection)
        except Exception:  # noqa: BLE001 - the client went away
            pass
        finally:
            connection.close()

    def try_server(server: ServerAddress) -> bytes | None:
        ours, theirs = socket.socketpair()
        threading.Thread(target=serve, args=(scenarios[server.address],
                                             Connection(Peer, theirs, 0)), daemon=True).start()
        try:
            with ours, zeroconf_mode.track(ours):
                return attempt.fetch_secret(ours, tls_credentials, gnutls.DEFAULT_PRIORITY,
                                            should_abort=zeroconf_mode.abandoned)
        except attempt.AttemptFailed:
            return None
        finally:
            ended[server.address] = time.monotonic()

    scheduler = AttemptScheduler(try_server, retry=10)
    try:
        scheduler.add(A)
        time.sleep(0.3)  # A's handshake is done and it waits
        scheduler.add(B)
        result = scheduler.run()
        returned = time.monotonic()
        assert result == b"sealed secret"
        assert scheduler.close(2.0)
        assert ended[A.address] - returned < 0.1
    finally:
        Peer.stopping.set()

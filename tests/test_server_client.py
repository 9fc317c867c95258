"""A client's life cycle, checkers, expiry and approval (SERVER.md §8, §9); the registry.

Timers are real (a real event loop, short durations); where exact
timestamps matter the client gets a clock the test sets.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import time
from pathlib import Path

import pytest

from mandos.server.checker import run_checker
from mandos.server.client import Client, ClientObserver, utcnow
from mandos.server.clients_conf import REFUSED_KEY_ID, ClientConfig
from mandos.server.registry import ClientRegistry, ServerObserver
from test_server_checker import living

td = datetime.timedelta
T0 = datetime.datetime(2024, 1, 2, 3, 4, 5)
KEY = "0123456789ABCDEF" * 4
COMMAND = "check h.example"


# --- test doubles ----------------------------------------------------------------------

class Clock:
    """A settable "now" for exact timestamps."""

    def __init__(self) -> None:
        self.value = T0

    def __call__(self) -> datetime.datetime:
        return self.value

    def advance(self, **delta: float) -> None:
        self.value += td(**delta)


class Recorder(ClientObserver):
    """Everything the client tells its observers."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, object]] = []
        self.signals: list[tuple] = []

    def property_changed(self, client: Client, name: str) -> None:
        self.changes.append((name, getattr(client, name)))

    def client_signal(self, client: Client, signal: str, *args) -> None:
        self.signals.append((signal, *args))

    def changed(self, name: str) -> list:
        return [value for changed, value in self.changes if changed == name]

    def emitted(self, name: str) -> list[tuple]:
        return [args[1:] for args in self.signals if args[0] == name]


class FakeChecker:
    """A checker runner: returns ``status`` at once, or (None) waits for finish()."""

    def __init__(self, status: int | None = 0) -> None:
        self.status = status
        self.commands: list[str] = []
        self.runs: list[asyncio.Future] = []
        self.cancelled = 0
        self.error: Exception | None = None

    async def __call__(self, command: str) -> int:
        self.commands.append(command)
        if self.error is not None:
            raise self.error
        if self.status is not None:
            return self.status
        future = asyncio.get_running_loop().create_future()
        self.runs.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def finish(self, status: int) -> None:
        """End the oldest unfinished run (it must have started)."""
        pending = [run for run in self.runs if not run.done()]
        assert pending, "no checker run is waiting"
        pending[0].set_result(status)


def make_config(**changes) -> ClientConfig:
    values = dict(name="c", key_id=KEY, secret=b"s3cret", host="h.example",
                  checker_command="check %(host)s")
    values.update(changes)
    return ClientConfig(**values)


def make_client(runner=None, clock=None, **changes) -> tuple[Client, Recorder]:
    client = Client(make_config(**changes), runner if runner is not None else FakeChecker(0),
                    now=clock if clock is not None else utcnow)
    recorder = Recorder()
    client.observers.append(recorder)
    return client, recorder


def run(scenario) -> None:
    """Run ``scenario()`` on a fresh event loop."""
    asyncio.run(scenario())


async def settle(rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(predicate, timeout: float = 3.0) -> float:
    """Wait for ``predicate()``; return the seconds it took."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def ms(n: float) -> td:
    return td(milliseconds=n)


# --- initial state (§8.1) ----------------------------------------------------------------

def test_initial_state_of_an_enabled_client():
    clock = Clock()
    client, _ = make_client(clock=clock, timeout=td(minutes=7))
    assert (client.name, client.key_id, client.secret, client.host) == (
        "c", KEY, b"s3cret", "h.example")
    assert client.enabled is True
    assert client.created == T0 and client.last_enabled == T0
    assert client.expires == T0 + td(minutes=7)
    assert client.last_checked_ok is None and client.last_approval_request is None
    assert client.last_checker_status == -2
    assert client.approved is None and client.approvals_pending == 0
    assert client.checker_running is False and client.current_checker_command is None


def test_initial_state_of_a_disabled_client():
    client, _ = make_client(clock=Clock(), enabled=False)
    assert client.enabled is False
    assert client.created == T0
    assert client.last_enabled is None and client.expires is None


def test_settings_are_copied_from_the_config():
    client, _ = make_client(interval=td(seconds=3), extended_timeout=td(hours=1),
                            approval_delay=td(seconds=4), approval_duration=td(seconds=5),
                            approved_by_default=False, fingerprint="FF")
    assert (client.interval, client.extended_timeout) == (td(seconds=3), td(hours=1))
    assert (client.approval_delay, client.approval_duration) == (td(seconds=4), td(seconds=5))
    assert (client.approved_by_default, client.fingerprint) == (False, "FF")
    assert client.checker_command == "check %(host)s"


# --- checker scheduling (§8.3) --------------------------------------------------------------

def test_init_checker_without_randomisation():
    async def scenario():
        clock, checker = Clock(), FakeChecker(None)
        client, _ = make_client(checker, clock, interval=ms(200))
        client.init_checker(randomize=False)
        assert client.expires == T0 + 2 * ms(200)
        await asyncio.sleep(0.1)
        assert checker.commands == []
        await until(lambda: len(checker.commands) == 1)
        await settle()
        checker.finish(0)
        took = await until(lambda: len(checker.commands) == 2)
        assert 0.1 < took < 0.6
        client.stop()
    run(scenario)


def test_init_checker_with_randomisation(monkeypatch):
    drawn = []

    def randint(low: int, high: int) -> int:
        drawn.append((low, high))
        return 50

    monkeypatch.setattr(random, "randint", randint)

    async def scenario():
        clock, checker = Clock(), FakeChecker(0)
        client, _ = make_client(checker, clock, interval=ms(200))
        client.init_checker(randomize=True)
        assert drawn == [(0, 200)]
        assert client.expires == T0 + ms(50) + ms(200)
        took = await until(lambda: len(checker.commands) == 1)
        assert took < 0.15
        took = await until(lambda: len(checker.commands) == 2)
        assert 0.12 < took < 0.6  # then every interval
        client.stop()
    run(scenario)


def test_random_first_start_lies_within_one_interval():
    async def scenario():
        clock = Clock()
        client, _ = make_client(FakeChecker(0), clock, interval=td(seconds=10))
        seen = set()
        for _ in range(200):
            client.init_checker(randomize=True)
            assert T0 + td(seconds=10) <= client.expires <= T0 + td(seconds=20)
            seen.add(client.expires)
        assert len(seen) > 100
        client.stop()
    run(scenario)


def test_random_first_start_raises_expiry_to_one_interval_from_then(monkeypatch):
    monkeypatch.setattr(random, "randint", lambda low, high: 10)

    async def scenario():
        clock, checker = Clock(), FakeChecker(None)
        client, _ = make_client(checker, clock, interval=ms(300))
        client.init_checker(randomize=True)
        assert client.expires == T0 + ms(310)
        clock.advance(seconds=60)
        await until(lambda: checker.commands)
        assert client.expires == T0 + td(seconds=60) + ms(300)
        client.stop()
    run(scenario)


def test_slow_checker_is_not_restarted_while_running():
    async def scenario():
        checker = FakeChecker(None)
        client, recorder = make_client(checker, interval=ms(100), timeout=td(minutes=5))
        client.init_checker(randomize=False)
        client.checked_ok()  # expiry out of the way
        await asyncio.sleep(0.45)
        assert checker.commands == [COMMAND] and client.checker_running
        assert client.start_checker() is False
        assert checker.cancelled == 0
        checker.finish(0)
        await until(lambda: len(checker.commands) == 2)
        assert recorder.emitted("CheckerStarted") == [(COMMAND,), (COMMAND,)]
        client.stop()
    run(scenario)


def test_checker_started_signal_and_running_property():
    async def scenario():
        checker = FakeChecker(None)
        client, recorder = make_client(checker)
        assert client.start_checker() is True
        assert client.checker_running is True
        assert client.current_checker_command == COMMAND
        assert recorder.emitted("CheckerStarted") == [(COMMAND,)]
        assert recorder.changed("checker_running") == [True]
        await settle()
        checker.finish(0)
        await settle()
        assert client.checker_running is False
        assert recorder.changed("checker_running") == [True, False]
    run(scenario)


def test_checker_command_renders_client_attributes_shell_quoted():
    async def scenario():
        checker = FakeChecker(0)
        client, _ = make_client(checker, host="a b", checker_command="ping %(host)s %(interval)s")
        client.start_checker()
        await settle()
        assert checker.commands == ["ping 'a b' 0:02:00"]
    run(scenario)


@pytest.mark.parametrize("template", ["ping %(nosuch)s", "ping %(host)d", "ping %(host)"])
def test_checker_command_formatting_error_is_logged_and_skipped(caplog, template):
    async def scenario():
        checker = FakeChecker(0)
        client, recorder = make_client(checker, checker_command=template, interval=ms(50))
        with caplog.at_level(logging.ERROR):
            assert client.start_checker() is False
            client.init_checker(randomize=False)
            client.checked_ok()  # expiry out of the way
            await asyncio.sleep(0.25)
        assert checker.commands == []
        assert recorder.emitted("CheckerStarted") == []
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) >= 3 and all("c" in r.getMessage() for r in errors)
        assert client.enabled
        client.stop()
    run(scenario)


def test_checker_that_cannot_run_is_logged_and_can_be_retried(caplog):
    async def scenario():
        checker = FakeChecker(0)
        checker.error = FileNotFoundError(2, "No such file")
        client, recorder = make_client(checker)
        with caplog.at_level(logging.ERROR):
            client.start_checker()
            await settle()
        assert "No such file" in caplog.text
        assert client.checker_running is False
        assert client.last_checker_status == -2
        assert recorder.emitted("CheckerCompleted") == []
        checker.error = None
        assert client.start_checker() is True
        await settle()
        assert client.last_checker_status == 0
    run(scenario)


# --- checker results (§8.4) ------------------------------------------------------------

def test_checker_success_bumps_expiry():
    async def scenario():
        clock, checker = Clock(), FakeChecker(None)
        client, recorder = make_client(checker, clock, timeout=td(minutes=5))
        client.start_checker()
        await settle()
        clock.advance(seconds=30)
        checker.finish(0)
        await settle()
        assert client.last_checked_ok == T0 + td(seconds=30)
        assert client.last_checker_status == 0
        assert client.expires == T0 + td(seconds=30) + td(minutes=5)
        assert recorder.emitted("CheckerCompleted") == [(0, 0, COMMAND)]
        client.stop()
    run(scenario)


def test_checker_failure_sets_status_only():
    async def scenario():
        clock, checker = Clock(), FakeChecker(None)
        client, recorder = make_client(checker, clock)
        expires = client.expires
        client.start_checker()
        await settle()
        clock.advance(seconds=30)
        checker.finish(3 << 8)
        await settle()
        assert client.last_checker_status == 3
        assert client.last_checked_ok is None
        assert client.expires == expires
        assert recorder.emitted("CheckerCompleted") == [(3, 3 << 8, COMMAND)]
        assert recorder.changed("expires") == []
    run(scenario)


def test_checker_killed_by_signal():
    async def scenario():
        checker = FakeChecker(9)
        client, recorder = make_client(checker)
        client.start_checker()
        await settle()
        assert client.last_checker_status == -1
        assert client.last_checker_signal == 9
        assert client.last_checked_ok is None
        assert recorder.emitted("CheckerCompleted") == [(-1, (-1 << 8) | 9, COMMAND)]
        assert (-1 << 8) | 9 == -247 and os.WTERMSIG(-247 & 0xFFFF) == 9
    run(scenario)


def test_checker_success_on_a_disabled_client_schedules_nothing():
    async def scenario():
        clock = Clock()
        client, _ = make_client(FakeChecker(0), clock, enabled=False)
        client.start_checker()
        await settle()
        assert client.last_checked_ok == T0 and client.last_checker_status == 0
        assert client.expires is None and client.enabled is False
    run(scenario)


@pytest.mark.parametrize("command, status, signal_number", [
    ("exit 0", 0, None), ("exit 3", 3, None), ("kill -TERM $$", -1, 15),
])
def test_real_checker_results(command, status, signal_number):
    async def scenario():
        client, recorder = make_client(run_checker, checker_command=command)
        client.start_checker()
        await until(lambda: recorder.emitted("CheckerCompleted"))
        assert client.last_checker_status == status
        if signal_number is None:
            assert recorder.emitted("CheckerCompleted") == [(status, status << 8, command)]
            assert (client.last_checked_ok is not None) == (status == 0)
        else:
            assert client.last_checker_signal == signal_number
            assert recorder.emitted("CheckerCompleted") == [
                (-1, (-1 << 8) | signal_number, command)]
    run(scenario)


# --- expiry (§8.5) ---------------------------------------------------------------------

def test_expiry_disables_the_client():
    async def scenario():
        checker = FakeChecker(1 << 8)
        client, recorder = make_client(checker, interval=ms(100), timeout=ms(300))
        client.init_checker(randomize=False)
        took = await until(lambda: not client.enabled)
        assert 0.15 < took < 1
        assert client.expires is None
        assert recorder.changed("enabled") == [False]
        started = len(checker.commands)
        await asyncio.sleep(0.25)
        assert len(checker.commands) == started  # no checkers once disabled
    run(scenario)


def test_successful_checks_keep_the_client_enabled():
    async def scenario():
        client, _ = make_client(FakeChecker(0), interval=ms(100), timeout=ms(250))
        client.init_checker(randomize=False)
        await asyncio.sleep(0.7)
        assert client.enabled and client.expires > utcnow()
        assert client.last_checker_status == 0
        client.stop()
    run(scenario)


@pytest.mark.parametrize("command, stays_enabled", [("true", True), ("false", False)])
def test_real_checkers_keep_or_lose_the_client(command, stays_enabled):
    async def scenario():
        client, _ = make_client(run_checker, checker_command=command, interval=ms(100),
                                timeout=ms(300))
        client.init_checker(randomize=False)
        await asyncio.sleep(0.6)
        assert client.enabled is stays_enabled
        assert client.last_checker_status == (0 if stays_enabled else 1)
        client.stop()
    run(scenario)


def test_checked_ok_reschedules_the_disable_timer():
    async def scenario():
        client, _ = make_client(FakeChecker(0), timeout=ms(400))
        client.checked_ok()
        await asyncio.sleep(0.25)
        client.checked_ok()
        await asyncio.sleep(0.25)
        assert client.enabled  # past the first expiry, before the second
        await until(lambda: not client.enabled)
    run(scenario)


# --- enable and disable (§8.2) ------------------------------------------------------------

def test_enable_starts_checkers_and_expires_after_two_intervals():
    async def scenario():
        clock, checker = Clock(), FakeChecker(0)
        client, recorder = make_client(checker, clock, enabled=False, interval=ms(100))
        clock.advance(seconds=5)
        client.enable()
        assert client.enabled and client.last_enabled == T0 + td(seconds=5)
        assert client.expires == T0 + td(seconds=5) + 2 * ms(100)
        assert [name for name, _ in recorder.changes] == ["enabled", "last_enabled", "expires"]
        assert checker.commands == []
        took = await until(lambda: checker.commands)
        assert 0.07 < took < 0.6
        client.stop()
    run(scenario)


def test_enable_when_enabled_does_nothing():
    async def scenario():
        checker = FakeChecker(0)
        client, recorder = make_client(checker, interval=ms(50))
        client.enable()
        await asyncio.sleep(0.12)
        assert recorder.changes == [] and checker.commands == []
    run(scenario)


def test_disable_cancels_everything():
    async def scenario():
        checker = FakeChecker(None)
        client, recorder = make_client(checker, interval=ms(100))
        client.init_checker(randomize=False)
        await until(lambda: checker.runs)  # the runner has started
        client.disable()
        assert client.enabled is False and client.expires is None
        assert client.checker_running is False
        await settle()
        assert checker.cancelled == 1
        assert recorder.emitted("CheckerCompleted") == []
        assert client.last_checker_status == -2
        await asyncio.sleep(0.35)
        assert len(checker.commands) == 1
        assert recorder.changed("enabled") == [False]
        assert recorder.changed("checker_running") == [True, False]
    run(scenario)


def test_disable_when_disabled_does_nothing():
    async def scenario():
        client, recorder = make_client(enabled=False)
        client.disable()
        assert recorder.changes == [] and recorder.signals == []
    run(scenario)


def test_disable_is_logged(caplog):
    async def scenario():
        client, _ = make_client()
        with caplog.at_level(logging.INFO):
            client.disable()
        assert "disabled" in caplog.text
    run(scenario)


def test_checker_stopped_at_once_reports_not_running():
    async def scenario():
        client, recorder = make_client(FakeChecker(None))
        client.start_checker()
        client.disable()
        await settle()
        assert client.checker_running is False
        assert recorder.changed("checker_running") == [True, False]
    run(scenario)


def test_disable_kills_a_real_checker_and_its_process_group(tmp_path: Path):
    pid_file = tmp_path / "pid"

    async def scenario():
        command = f"echo $$ > {pid_file}; sleep 100 & sleep 100; wait"
        client, recorder = make_client(run_checker, checker_command=command)
        client.start_checker()
        await until(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"))
        pgid = int(pid_file.read_text())
        await until(lambda: len(living(pgid)) == 3)
        client.disable()
        await until(lambda: living(pgid) == [])
        await until(lambda: recorder.changed("checker_running") == [True, False])
        assert recorder.emitted("CheckerCompleted") == []
        assert client.last_checker_status == -2
    run(scenario)


def test_stop_cancels_timers_and_checker_but_does_not_disable():
    async def scenario():
        checker = FakeChecker(None)
        client, _ = make_client(checker, interval=ms(50))
        client.init_checker(randomize=False)
        client.checked_ok()  # expiry out of the way
        await until(lambda: checker.runs)  # the runner has started
        client.approve(True)
        client.stop()
        await asyncio.sleep(0.3)
        assert checker.cancelled == 1 and len(checker.commands) == 1
        assert client.enabled is True
        assert client.approved is True  # no reset timer any more
    run(scenario)


# --- property writes (§8.6) -------------------------------------------------------------

def test_set_timeout_moves_the_expiry_by_the_difference():
    async def scenario():
        clock = Clock()
        client, recorder = make_client(clock=clock, timeout=td(minutes=5))
        client.set_timeout(td(minutes=12))
        assert client.timeout == td(minutes=12)
        assert client.expires == T0 + td(minutes=12)
        assert recorder.changes == [("timeout", td(minutes=12)), ("expires", T0 + td(minutes=12))]
        client.stop()
    run(scenario)


@pytest.mark.parametrize("minutes", [4, 3])
def test_set_timeout_disables_when_the_expiry_is_past(minutes):
    async def scenario():
        clock = Clock()
        client, _ = make_client(clock=clock, timeout=td(minutes=5))
        clock.advance(minutes=4)
        client.set_timeout(td(minutes=minutes))  # expiry now (4) or a minute ago (3)
        assert client.enabled is False and client.expires is None
        assert client.timeout == td(minutes=minutes)
    run(scenario)


def test_set_timeout_reschedules_the_disable_timer():
    async def scenario():
        client, _ = make_client(timeout=td(minutes=10))
        client.checked_ok()
        client.set_timeout(ms(150))
        assert client.enabled
        took = await until(lambda: not client.enabled)
        assert 0.1 < took < 0.6
    run(scenario)


def test_set_timeout_on_a_disabled_client_only_stores_it():
    async def scenario():
        client, recorder = make_client(enabled=False)
        client.set_timeout(td(seconds=1))
        assert client.timeout == td(seconds=1) and client.expires is None
        assert recorder.changes == [("timeout", td(seconds=1))]
    run(scenario)


def test_set_interval_restarts_the_schedule_and_starts_a_checker_now():
    async def scenario():
        clock, checker = Clock(), FakeChecker(1 << 8)
        client, recorder = make_client(checker, clock, interval=td(seconds=10))
        client.init_checker(randomize=False)
        expires = client.expires
        client.set_interval(ms(100))
        assert client.interval == ms(100)
        assert len(checker.commands) == 0 and client.checker_running  # started now
        await settle()
        assert len(checker.commands) == 1
        took = await until(lambda: len(checker.commands) == 2)
        assert 0.07 < took < 0.6
        assert client.expires == expires
        assert recorder.changed("interval") == [ms(100)]
        client.stop()
    run(scenario)


def test_set_interval_on_a_disabled_client_only_stores_it():
    async def scenario():
        checker = FakeChecker(0)
        client, _ = make_client(checker, enabled=False)
        client.set_interval(ms(50))
        await asyncio.sleep(0.12)
        assert client.interval == ms(50) and checker.commands == []
    run(scenario)


def test_set_secret_is_observed():
    client, recorder = make_client()
    client.set_secret(bytearray(b"new"))
    assert client.secret == b"new" and isinstance(client.secret, bytes)
    assert recorder.changed("secret") == [b"new"]


# --- approval (§9) ----------------------------------------------------------------------

async def ask(client: Client) -> asyncio.Task:
    """A connection asking for the secret, started and waiting."""
    task = asyncio.ensure_future(client.may_have_secret())
    await settle()
    return task


def test_no_approval_delay_means_yes_at_once():
    async def scenario():
        client, recorder = make_client()
        assert await client.may_have_secret() is True
        assert recorder.signals == [] and recorder.changes == []
    run(scenario)


def test_no_approval_delay_ignores_approved_by_default():
    async def scenario():
        client, _ = make_client(approved_by_default=False)
        client.approve(False)
        assert await client.may_have_secret() is True
    run(scenario)


def test_disabled_client_is_rejected_as_disabled():
    async def scenario():
        client, recorder = make_client(enabled=False)
        assert await client.may_have_secret() is False
        assert recorder.emitted("Rejected") == [("Disabled",)]
    run(scenario)


def test_need_approval_carries_delay_and_default_and_sets_last_approval_request():
    async def scenario():
        clock = Clock()
        client, recorder = make_client(clock=clock, approval_delay=ms(1500),
                                       approved_by_default=False)
        clock.advance(seconds=7)
        task = await ask(client)
        assert recorder.emitted("NeedApproval") == [(1500, False)]
        assert client.last_approval_request == T0 + td(seconds=7)
        assert recorder.changed("last_approval_request") == [T0 + td(seconds=7)]
        task.cancel()
    run(scenario)


def test_approve_while_waiting_gives_the_secret():
    async def scenario():
        client, recorder = make_client(approval_delay=td(seconds=10))
        task = await ask(client)
        assert client.approvals_pending == 1 and not task.done()
        client.approve(True)
        assert await asyncio.wait_for(task, 1) is True
        assert client.approvals_pending == 0
        assert recorder.changed("approvals_pending") == [1, 0]
        assert recorder.emitted("Rejected") == []
        client.stop()
    run(scenario)


def test_deny_while_waiting_rejects_as_denied():
    async def scenario():
        client, recorder = make_client(approval_delay=td(seconds=10))
        task = await ask(client)
        client.approve(False)
        assert await asyncio.wait_for(task, 1) is False
        assert recorder.emitted("Rejected") == [("Denied",)]
        assert client.approvals_pending == 0
        client.stop()
    run(scenario)


def test_approval_timeout_without_default_rejects():
    async def scenario():
        client, recorder = make_client(approval_delay=ms(200), approved_by_default=False)
        started = time.monotonic()
        assert await client.may_have_secret() is False
        assert 0.18 < time.monotonic() - started < 1
        assert recorder.emitted("Rejected") == [("Approval timed out",)]
        assert recorder.emitted("NeedApproval") == [(200, False)]
    run(scenario)


def test_approval_timeout_with_default_gives_the_secret():
    async def scenario():
        client, recorder = make_client(approval_delay=ms(200), approved_by_default=True)
        started = time.monotonic()
        assert await client.may_have_secret() is True
        assert 0.18 < time.monotonic() - started < 1
        assert recorder.emitted("Rejected") == []
    run(scenario)


def test_pre_approval_within_approval_duration_applies():
    async def scenario():
        client, recorder = make_client(approval_delay=td(seconds=10),
                                       approval_duration=td(seconds=1))
        client.approve(True)
        assert await asyncio.wait_for(client.may_have_secret(), 1) is True
        assert recorder.emitted("NeedApproval") == []
        client.approve(False)
        assert await asyncio.wait_for(client.may_have_secret(), 1) is False
        assert recorder.emitted("Rejected") == [("Denied",)]
        client.stop()
    run(scenario)


def test_approval_lapses_after_approval_duration():
    async def scenario():
        client, recorder = make_client(approval_delay=ms(100), approval_duration=ms(100),
                                       approved_by_default=False)
        client.approve(True)
        await asyncio.sleep(0.2)
        assert client.approved is None
        assert await client.may_have_secret() is False
        assert recorder.emitted("Rejected") == [("Approval timed out",)]
    run(scenario)


def test_second_approval_cancels_the_first_reset():
    async def scenario():
        client, _ = make_client(approval_duration=ms(400))
        client.approve(True)
        await asyncio.sleep(0.2)
        client.approve(True)
        await asyncio.sleep(0.25)  # past the first decision's reset
        assert client.approved is True
        await asyncio.sleep(0.3)  # past the second's
        assert client.approved is None
    run(scenario)


def test_approval_reaches_a_waiting_connection_even_with_zero_approval_duration():
    async def scenario():
        client, recorder = make_client(approval_delay=ms(300), approval_duration=td(0),
                                       approved_by_default=False)
        task = await ask(client)
        client.approve(True)
        assert await asyncio.wait_for(task, 1) is True
        assert recorder.emitted("Rejected") == []
    run(scenario)


def test_disable_during_the_wait_rejects_promptly():
    async def scenario():
        client, recorder = make_client(approval_delay=td(seconds=10), approved_by_default=True)
        task = await ask(client)
        started = time.monotonic()
        client.disable()
        assert await asyncio.wait_for(task, 1) is False
        assert time.monotonic() - started < 0.5  # not the 10 s delay
        assert recorder.emitted("Rejected") == [("Disabled",)]
        assert client.approvals_pending == 0
    run(scenario)


def test_no_secret_after_the_wait_runs_out_on_a_disabled_client(monkeypatch):
    async def scenario():
        client, recorder = make_client(approval_delay=ms(150), approved_by_default=True)
        # a disable that wakes nobody, as the original's
        monkeypatch.setattr(Client, "_wake_waiters", lambda *args: None)
        task = await ask(client)
        client.disable()
        assert await asyncio.wait_for(task, 1) is False
        assert recorder.emitted("Rejected") == [("Disabled",)]
    run(scenario)


def test_approvals_pending_counts_concurrent_waiters():
    async def scenario():
        client, recorder = make_client(approval_delay=td(seconds=10))
        tasks = [await ask(client) for _ in range(3)]
        assert client.approvals_pending == 3
        assert recorder.emitted("NeedApproval") == [(10000, True)] * 3
        client.approve(True)
        assert await asyncio.wait_for(asyncio.gather(*tasks), 1) == [True] * 3
        assert recorder.changed("approvals_pending") == [1, 2, 3, 2, 1, 0]
        client.stop()
    run(scenario)


def test_dropped_connection_stops_counting_as_pending():
    async def scenario():
        client, _ = make_client(approval_delay=td(seconds=10))
        task = await ask(client)
        task.cancel()
        await settle()
        assert client.approvals_pending == 0
    run(scenario)


# --- the secret was sent (§8.5, §9) --------------------------------------------------------

def test_secret_sent_extends_expiry_by_extended_timeout():
    async def scenario():
        clock = Clock()
        client, recorder = make_client(clock=clock, timeout=td(minutes=5),
                                       extended_timeout=td(minutes=15))
        clock.advance(minutes=1)
        client.secret_sent()
        assert client.expires == T0 + td(minutes=16)
        assert recorder.emitted("GotSecret") == [()]
        client.stop()
    run(scenario)


def test_secret_sent_never_shortens_the_expiry():
    async def scenario():
        clock = Clock()
        client, recorder = make_client(clock=clock, timeout=td(minutes=5),
                                       extended_timeout=td(minutes=1))
        client.secret_sent()
        assert client.expires == T0 + td(minutes=5)
        assert recorder.changed("expires") == []
        assert recorder.emitted("GotSecret") == [()]
    run(scenario)


def test_secret_sent_moves_the_disable_timer():
    async def scenario():
        client, _ = make_client(timeout=ms(100), extended_timeout=td(seconds=10))
        client.checked_ok()
        client.secret_sent()
        await asyncio.sleep(0.3)
        assert client.enabled
        client.stop()
    run(scenario)


# --- observers ---------------------------------------------------------------------------

def test_observers_hear_each_change():
    async def scenario():
        clock = Clock()
        client, recorder = make_client(clock=clock)
        clock.advance(seconds=1)
        client.checked_ok()
        assert recorder.changes == [("last_checked_ok", T0 + td(seconds=1)),
                                    ("last_checker_status", 0),
                                    ("expires", T0 + td(seconds=1) + td(minutes=5))]
        client.stop()
    run(scenario)


def test_no_change_no_notification():
    async def scenario():
        clock = Clock()
        client, recorder = make_client(clock=clock)
        client.checked_ok()
        before = list(recorder.changes)
        client.checked_ok()
        client.set_timeout(client.timeout)
        client.set_interval(client.interval)
        assert recorder.changes == before
        client.stop()
    run(scenario)


def test_every_observer_is_told():
    async def scenario():
        client, first = make_client(enabled=False)
        second = Recorder()
        client.observers.append(second)
        client.enable()
        assert first.changes == second.changes != []
        client.stop()
    run(scenario)


# --- the registry ---------------------------------------------------------------------------

class ServerRecorder(ServerObserver):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def client_added(self, client: Client) -> None:
        self.events.append(("added", client.name))

    def client_removed(self, client: Client) -> None:
        self.events.append(("removed", client.name))

    def client_not_found(self, key_id: str, address: str) -> None:
        self.events.append(("not found", key_id, address))


def registry_with(*configs: ClientConfig) -> tuple[ClientRegistry, ServerRecorder]:
    registry = ClientRegistry()
    recorder = ServerRecorder()
    registry.observers.append(recorder)
    for config in configs:
        registry.add(Client(config, FakeChecker(0)))
    return registry, recorder


def test_registry_add_and_iterate_in_order():
    registry, recorder = registry_with(make_config(name="b"), make_config(name="a"))
    assert [c.name for c in registry] == ["b", "a"] and len(registry) == 2
    assert recorder.events == [("added", "b"), ("added", "a")]


def test_registry_find_by_key_id_is_case_insensitive():
    registry, _ = registry_with(make_config(name="a", key_id="AB" * 32),
                                make_config(name="b", key_id="CD" * 32))
    assert registry.find_by_key_id("cd" * 32).name == "b"
    assert registry.find_by_key_id("Ab" * 32).name == "a"
    assert registry.find_by_key_id("EF" * 32) is None


def test_registry_refused_empty_key_id_never_matches():
    registry, _ = registry_with(make_config(name="a", key_id=REFUSED_KEY_ID))
    assert registry.find_by_key_id(REFUSED_KEY_ID) is None
    assert registry.find_by_key_id(REFUSED_KEY_ID.lower()) is None


def test_registry_empty_key_id_never_matches():
    registry, _ = registry_with(make_config(name="legacy", key_id="", fingerprint="AA"))
    assert registry.find_by_key_id("") is None


def test_registry_find_by_fingerprint():
    registry, _ = registry_with(make_config(name="a", key_id="", fingerprint="474D4B94"),
                                make_config(name="b", key_id=KEY, fingerprint=""))
    assert registry.find_by_fingerprint("474d4b94").name == "a"
    assert registry.find_by_fingerprint("") is None
    assert registry.find_by_fingerprint("FFFF") is None


def test_registry_remove_disables_and_forgets():
    async def scenario():
        registry, recorder = registry_with(make_config(name="a"), make_config(name="b"))
        client = registry.find_by_key_id(KEY)
        client.init_checker(randomize=False)
        removed = registry.remove("a")
        assert removed is client and removed.enabled is False
        assert [c.name for c in registry] == ["b"]
        assert recorder.events[-1] == ("removed", "a")
        with pytest.raises(KeyError):
            registry.remove("a")
        for remaining in registry:
            remaining.stop()
    run(scenario)


def test_registry_remove_refuses_waiting_connections():
    async def scenario():
        config = make_config(name="a", approval_delay=td(seconds=10))
        registry, _ = registry_with(config)
        (client,) = list(registry)
        task = await ask(client)
        registry.remove("a")
        assert await asyncio.wait_for(task, 1) is False
    run(scenario)


def test_registry_not_found_notifies_observers(caplog):
    registry, recorder = registry_with()
    with caplog.at_level(logging.INFO):
        registry.not_found("AB" * 32, "::ffff:192.0.2.1")
    assert recorder.events == [("not found", "AB" * 32, "::ffff:192.0.2.1")]
    assert "::ffff:192.0.2.1" in caplog.text

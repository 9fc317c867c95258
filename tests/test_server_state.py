"""The persistent state files (SERVER.md §10; DESIGN.md §3 item 8)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import os
import pickle
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mandos.server import clients_conf, state
from mandos.server.client import Client, ClientObserver, utcnow
from mandos.server.registry import ClientRegistry

REPO = Path(__file__).resolve().parent.parent
td = datetime.timedelta
NOW = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)
KEY_ID = "AB" * 32
SECRET = b"\x00TOP-SECRET\xffpassphrase\x01" * 3


def section(name: str = "foo", secret: bytes = SECRET, **settings: str) -> str:
    """One clients.conf section; ``settings`` override the defaults."""
    lines = [f"[{name}]", f"key_id = {KEY_ID}",
             f"secret = {base64.b64encode(secret).decode()}"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def config(name: str = "foo", **settings: str) -> clients_conf.ClientConfig:
    return clients_conf.parse(section(name, **settings))[0]


async def never_runs(command: str) -> int:
    raise AssertionError("no checker expected")


def make_client(cfg: clients_conf.ClientConfig, runner=never_runs, now=None) -> Client:
    return Client(cfg, runner) if now is None else Client(cfg, runner, now=lambda: now)


def stored_state(cfg: clients_conf.ClientConfig, previous: clients_conf.ClientConfig | None = None,
                 **fields) -> state.StoredState:
    """Saved state for ``cfg``'s client, as the previous run (with ``previous``) left it."""
    previous = previous or cfg
    saved = {"host": previous.host, "checker_command": previous.checker_command,
             "timeout": previous.timeout, "extended_timeout": previous.extended_timeout,
             "interval": previous.interval, "approval_delay": previous.approval_delay,
             "approval_duration": previous.approval_duration,
             "approved_by_default": previous.approved_by_default, "enabled": previous.enabled,
             "created": NOW - td(days=30), "last_enabled": NOW - td(days=2),
             "expires": NOW + td(minutes=3), "last_checked_ok": NOW - td(minutes=2),
             "last_checker_status": 0, "last_approval_request": None}
    saved.update(fields)
    return state.StoredState(clients={cfg.name: saved},
                             previous_config={cfg.name: dict(previous.settings)})


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def client_path(tmp_path, name: str = "foo") -> Path:
    return tmp_path / "clients" / state.client_file_name(name)


def client_files(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path / "clients"))


# -- the files: round trip, atomicity, errors ---------------------------------

def test_every_field_survives_a_round_trip(tmp_path):
    cfg = config(host="h.example", checker="ping -c1 %%(host)s", timeout="PT7M")
    client = make_client(cfg, now=NOW)
    values = {"host": "other.example", "checker_command": "true %(name)s",
              "timeout": td(minutes=11, milliseconds=5), "extended_timeout": td(hours=1),
              "interval": td(seconds=90), "approval_delay": td(seconds=12, milliseconds=345),
              "approval_duration": td(seconds=3), "approved_by_default": False, "enabled": True,
              "created": NOW - td(days=400), "last_enabled": NOW - td(hours=5),
              "expires": NOW + td(minutes=1, microseconds=17), "last_checked_ok": NOW,
              "last_checker_status": 42, "last_approval_request": NOW - td(seconds=1)}
    assert set(values) == set(state.FIELDS)
    for name, value in values.items():
        setattr(client, name, value)
    state.StateFile(str(tmp_path)).save([client], {"foo": cfg})
    stored = state.StateFile(str(tmp_path)).load()
    assert stored.clients == {"foo": values}
    assert stored.previous_config == {"foo": cfg.settings}


def test_null_timestamps_and_a_disabled_client_survive_a_round_trip(tmp_path):
    cfg = config(enabled="no")
    client = make_client(cfg, now=NOW)
    state.StateFile(str(tmp_path)).save([client], {"foo": cfg})
    fields = state.StateFile(str(tmp_path)).load().clients["foo"]
    assert fields["enabled"] is False
    assert fields["last_enabled"] is fields["expires"] is fields["last_checked_ok"] is None
    assert fields["last_checker_status"] == -2
    assert fields["created"] == NOW


def test_json_layout_is_documented_form(tmp_path):
    cfg = config()
    client = make_client(cfg, now=NOW)
    state.StateFile(str(tmp_path)).save([client], {"foo": cfg})
    document = json.loads((tmp_path / "clients" / "foo.json").read_text())
    assert (document["version"], document["name"]) == (2, "foo")
    fields = document["fields"]
    assert fields["timeout"] == 300_000  # milliseconds
    assert fields["created"] == "2024-05-06T07:08:09.123456"
    assert fields["expires"] == "2024-05-06T07:13:09.123456"
    assert fields["last_checked_ok"] is None
    assert document["previous_config"]["checker"] == "fping -q -- %(host)s"
    index = json.loads((tmp_path / "clients.json").read_text())
    assert index == {"version": 2, "directory": "clients", "clients": {"foo": "foo.json"}}


HOSTILE_NAMES = ["../x", "a/b", ".", "..", "", "with space", "tab\there", "é ü 名前",
                 "%2E", "%", "x.json", ".hidden", "~", "a" * 300, "é" * 200, "\udcff"]


def test_file_names_of_hostile_client_names_stay_in_the_directory_and_are_distinct(tmp_path):
    text = "".join(section(f"c{i}") for i in range(len(HOSTILE_NAMES)))
    cfgs = clients_conf.parse(text)
    clients = []
    for name, cfg in zip(HOSTILE_NAMES, cfgs):
        client = make_client(cfg, now=NOW)
        client.name = name
        client.host = f"host of {name!r}"
        clients.append(client)
    state.StateFile(str(tmp_path)).save(clients, {})
    names = [state.client_file_name(name) for name in HOSTILE_NAMES]
    assert len(set(names)) == len(names)
    for file_name in names:
        assert "/" not in file_name and "\0" not in file_name
        assert not file_name.startswith(".") and file_name not in (".", "..")
        assert file_name.endswith(".json") and len(file_name.encode()) <= 255
        assert set(file_name) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                     "0123456789_-%~.")
    assert sorted(os.listdir(tmp_path)) == ["clients", "clients.json"]  # nothing escaped
    assert client_files(tmp_path) == sorted(names)
    assert state.client_file_name("../x") == "%2E%2E%2Fx.json"
    assert state.client_file_name("a/b") == "a%2Fb.json"
    assert state.client_file_name(".") == "%2E.json"
    stored = state.StateFile(str(tmp_path)).load()
    assert set(stored.clients) == set(HOSTILE_NAMES)
    for name in HOSTILE_NAMES:
        assert stored.clients[name]["host"] == f"host of {name!r}"


def test_a_file_holding_another_name_than_its_own_is_ignored(tmp_path, caplog):
    cfg = config()
    state.StateFile(str(tmp_path)).save([make_client(cfg)], {"foo": cfg})
    os.rename(client_path(tmp_path), client_path(tmp_path, "bar"))
    assert state.StateFile(str(tmp_path)).load().clients == {}
    assert any("holds client 'foo'" in m for m in warnings_of(caplog))


def test_saved_files_have_mode_0600_and_no_temporary_file_remains(tmp_path):
    cfg = config()
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        for _ in range(3):
            state.StateFile(str(tmp_path)).save([make_client(cfg)], {"foo": cfg})
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(tmp_path)) == ["clients", "clients.json"]
    assert client_files(tmp_path) == ["foo.json"]
    assert stat.S_IMODE(os.stat(client_path(tmp_path)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "clients.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "clients").st_mode) == 0o700


def test_files_are_fsynced_before_the_rename_and_the_directory_once_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        events.append(("fsync", "dir" if stat.S_ISDIR(mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.dirname(src) == os.path.dirname(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    configs = {name: config(name) for name in ("foo", "bar", "baz")}
    state.StateFile(str(tmp_path)).save([make_client(c) for c in configs.values()], configs)
    one_file = [("fsync", "file"), ("replace", True)]
    # Three clients' files, one directory fsync; then the index and its directory.
    assert events == one_file * 3 + [("fsync", "dir")] + one_file + [("fsync", "dir")]


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    cfg = config()
    state_file = state.StateFile(str(tmp_path))
    state_file.save([make_client(cfg, now=NOW)], {"foo": cfg})
    before = client_path(tmp_path).read_bytes()

    def replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        state_file.save([make_client(cfg, now=NOW + td(days=1))], {"foo": cfg})
    assert client_files(tmp_path) == ["foo.json"]
    assert client_path(tmp_path).read_bytes() == before


def test_sigkill_during_saves_always_leaves_complete_files(tmp_path):
    # Big files with little to encode, so that kills often land inside
    # the writing of a file, not only in the encoding before it.
    text = "".join(section(f"client{i}", host=f"{i:02}" * 100_000) for i in range(10))
    configs = {cfg.name: cfg for cfg in clients_conf.parse(text)}
    clients = [make_client(cfg, now=NOW) for cfg in configs.values()]
    state_file = state.StateFile(str(tmp_path))
    state_file.save(clients, configs)
    newest = 0
    for _ in range(20):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child saves in a loop until it is killed
            try:
                os.close(ready_r)
                os.write(ready_w, b"x")
                for round_number in range(newest + 1, 1_000_000):
                    for client in clients:
                        client.last_checker_status = round_number
                    state_file.save(clients, configs)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        time.sleep(random.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        stored = state.StateFile(str(tmp_path)).load()
        assert stored is not None and set(stored.clients) == set(configs)  # every file whole
        # Each save writes the files in client order, with a round number
        # higher than any before: a prefix of them is always the newest.
        statuses = [stored.clients[f"client{i}"]["last_checker_status"] for i in range(10)]
        assert statuses == sorted(statuses, reverse=True)
        newest = max(newest, *statuses)
    assert newest > 0  # the children did replace the files
    # load() removed stale temporary files
    assert sorted(os.listdir(tmp_path)) == ["clients", "clients.json"]
    assert client_files(tmp_path) == sorted(f"client{i}.json" for i in range(10))


def test_missing_state_warns_and_gives_no_state(tmp_path, caplog):
    assert state.StateFile(str(tmp_path)).load() is None
    assert any("No saved state" in message for message in warnings_of(caplog))


@pytest.mark.parametrize("content", [
    b'{"version": 2, "name": "foo", "fields": {"host": "x"', b"", b"\xff\xfe\x00garbage",
    b"[1, 2, 3]", b'{"version": 1, "name": "foo", "fields": {}, "previous_config": null}',
    b'{"version": 2, "name": "foo", "fields": [], "previous_config": null}',
    b'{"version": 2, "name": 7, "fields": {}, "previous_config": null}',
    b"[" * 100_000, "CHANGE:timeout=PT5M", "CHANGE:interval=1000000000000000000000000000000",
    "DROP:created", "SETTINGS:{\"host\": 1}",
], ids=["truncated", "empty", "not-utf8", "not-an-object", "unknown-version",
        "fields-not-an-object", "name-not-text", "nested-too-deep", "duration-not-ms",
        "duration-too-big", "field-missing", "settings-not-text"])
def test_corrupt_client_file_warns_and_that_client_starts_fresh(tmp_path, caplog, content):
    configs = {name: config(name) for name in ("foo", "bar")}
    state_file = state.StateFile(str(tmp_path))
    state_file.save([make_client(cfg) for cfg in configs.values()], configs)
    if isinstance(content, str):
        document = json.loads(client_path(tmp_path).read_text())
        kind, _, change = content.partition(":")
        if kind == "CHANGE":
            key, _, value = change.partition("=")
            document["fields"][key] = json.loads(value) if value.isdigit() else value
        elif kind == "DROP":
            del document["fields"][change]
        else:
            document["previous_config"] = json.loads(change)
        content = json.dumps(document).encode()
    client_path(tmp_path).write_bytes(content)
    stored = state_file.load()
    assert set(stored.clients) == set(stored.previous_config) == {"bar"}
    assert any("corrupt state file" in m and "foo.json" in m for m in warnings_of(caplog))
    # ...and the fresh start replaces it with a good file.
    state_file.save([make_client(cfg) for cfg in configs.values()], configs)
    assert set(state_file.load().clients) == {"foo", "bar"}


def test_other_io_errors_are_raised(tmp_path):
    cfg = config()
    state.StateFile(str(tmp_path)).save([make_client(cfg)], {"foo": cfg})
    client_path(tmp_path).unlink()
    client_path(tmp_path).mkdir()
    with pytest.raises(IsADirectoryError):
        state.StateFile(str(tmp_path)).load()


def test_files_of_clients_no_longer_there_are_deleted_by_a_full_save(tmp_path):
    configs = {name: config(name) for name in ("foo", "bar")}
    state_file = state.StateFile(str(tmp_path))
    state_file.save([make_client(cfg) for cfg in configs.values()], configs)
    (tmp_path / "clients" / "README").write_text("not a client's file")
    state_file.save([make_client(configs["bar"])], configs)
    assert client_files(tmp_path) == ["README", "bar.json"]
    assert json.loads((tmp_path / "clients.json").read_text())["clients"] == {
        "bar": "bar.json"}


OLD_LAYOUT_CLIENT = {
    "host": "old.example", "checker_command": "true", "timeout": 600_000,
    "extended_timeout": 900_000, "interval": 120_000, "approval_delay": 0,
    "approval_duration": 1000, "approved_by_default": True, "enabled": False,
    "created": "2024-01-02T03:04:05.123456", "last_enabled": None, "expires": None,
    "last_checked_ok": None, "last_checker_status": -2, "last_approval_request": None}


def test_the_single_file_layout_is_read_once_and_replaced(tmp_path, caplog):
    cfg = config()
    old = {"version": 1, "clients": {"foo": OLD_LAYOUT_CLIENT,
                                     "bad": dict(OLD_LAYOUT_CLIENT, timeout="PT5M")},
           "previous_config": {"foo": dict(cfg.settings)}}
    (tmp_path / "clients.json").write_text(json.dumps(old))
    state_file = state.StateFile(str(tmp_path))
    stored = state_file.load()
    assert set(stored.clients) == {"foo"}
    assert stored.clients["foo"]["timeout"] == td(minutes=10)
    assert stored.clients["foo"]["enabled"] is False
    assert stored.previous_config == {"foo": cfg.settings}
    assert any("Ignoring the saved state of client bad" in m for m in warnings_of(caplog))
    # A crash before the first save: the old file is read again.
    (tmp_path / "clients").mkdir()
    assert state_file.load().clients["foo"]["timeout"] == td(minutes=10)
    # The first save writes the clients' files, then replaces the old file.
    [(merged, fields)] = state.merge([cfg], stored, NOW)
    client = make_client(merged)
    state.apply(client, fields)
    state_file.save([client], {"foo": cfg})
    assert json.loads((tmp_path / "clients.json").read_text())["version"] == 2
    client.timeout = td(minutes=3)
    state_file.write({"foo": state.client_document("foo", state.snapshot(client),
                                                   dict(cfg.settings))})
    assert state_file.load().clients["foo"]["timeout"] == td(minutes=3)


class _RunsCodeWhenUnpickled:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_original_clients_pickle_is_ignored_with_one_warning_never_unpickled(tmp_path, caplog):
    armed = tmp_path.parent / (tmp_path.name + "-armed")
    pickle.loads(pickle.dumps(_RunsCodeWhenUnpickled(str(armed)))).close()
    assert armed.exists()  # the trap works: unpickling would run code
    armed.unlink()
    marker = tmp_path.parent / (tmp_path.name + "-marker")
    payload = pickle.dumps((_RunsCodeWhenUnpickled(str(marker)), {}), protocol=2)
    (tmp_path / "clients.pickle").write_bytes(payload)

    assert state.StateFile(str(tmp_path)).load() is None  # no state of ours yet
    pickle_warnings = [m for m in warnings_of(caplog) if "clients.pickle" in m]
    assert len(pickle_warnings) == 1
    assert not marker.exists()
    assert (tmp_path / "clients.pickle").read_bytes() == payload  # left alone

    caplog.clear()
    cfg = config()
    state.StateFile(str(tmp_path)).save([make_client(cfg)], {"foo": cfg})
    assert state.StateFile(str(tmp_path)).load().clients.keys() == {"foo"}
    assert len([m for m in warnings_of(caplog) if "clients.pickle" in m]) == 1
    assert not marker.exists()


def all_saved_bytes(tmp_path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(tmp_path.rglob("*"))
                    if path.is_file() and path.name != "clients.pickle")


def test_secrets_are_never_written(tmp_path):
    runtime_secret = b"\x02RUNTIME-SECRET\xfe-changed-over-dbus"
    cfg = config()
    assert cfg.secret == SECRET

    async def scenario():
        registry, state_file, saver = setup_saver(tmp_path, section() + section("bar"))
        saver.save_soon()
        await settled(saver)
        registry.clients["bar"].set_secret(runtime_secret)
        registry.clients["bar"].checked_ok()  # ...and its file is written
        await settled(saver)
        saver.close()
        assert state_file.client_writes == 3

    asyncio.run(scenario())
    data = all_saved_bytes(tmp_path)
    assert data
    for secret in (SECRET, runtime_secret):
        for form in (secret, base64.b64encode(secret), secret.hex().encode(),
                     secret.hex().upper().encode(), secret[1:11]):
            assert form not in data
    for name in ("foo", "bar"):
        document = json.loads(client_path(tmp_path, name).read_text())
        assert "secret" not in document["fields"]
        assert "secret" not in document["previous_config"]
    # ...so a secret changed at run time is lost at restart: the config's wins.
    stored = state.StateFile(str(tmp_path)).load()
    [(merged, _)] = state.merge([config("bar")], stored, NOW)
    assert merged.secret == SECRET


# -- saving on changes --------------------------------------------------------

class CountingStateFile(state.StateFile):
    """A StateFile that counts the files it writes and deletes."""

    def __init__(self, statedir: str) -> None:
        super().__init__(statedir)
        self.client_writes = 0
        self.index_writes = 0
        self.deletes = 0
        self.written: list[str] = []

    def write_file(self, directory, file_name, data) -> None:
        if file_name == state.FILE_NAME and directory == self.statedir:
            self.index_writes += 1
        else:
            self.client_writes += 1
            self.written.append(file_name)
        super().write_file(directory, file_name, data)

    def delete_file(self, file_name) -> None:
        self.deletes += 1
        super().delete_file(file_name)


def setup_saver(tmp_path, text: str | None = None, runner=never_runs):
    configs = {cfg.name: cfg for cfg in clients_conf.parse(text or section())}
    registry = ClientRegistry()
    for cfg in configs.values():
        registry.add(make_client(cfg, runner))
    state_file = CountingStateFile(str(tmp_path))
    saver = state.StateSaver(state_file, registry, configs)
    return registry, state_file, saver


async def settled(saver: state.StateSaver, timeout: float = 10.0) -> None:
    """Wait (letting the loop run) until the writer has written everything."""
    deadline = time.monotonic() + timeout
    await asyncio.sleep(0)
    while saver.pending:
        assert time.monotonic() < deadline, "the writer did not finish"
        await asyncio.sleep(0.002)


def test_a_burst_of_changes_in_one_loop_iteration_is_one_write(tmp_path):
    async def scenario():
        registry, state_file, saver = setup_saver(tmp_path)
        client = registry.clients["foo"]
        client.checked_ok()
        client.set_timeout(td(minutes=9))
        client.set_interval(td(minutes=1))
        client.bump_timeout(td(minutes=20))
        client.disable()
        client.enable()
        client.checked_ok()
        client.set_timeout(td(minutes=8))
        client.secret_sent()
        client.disable()
        assert saver.pending
        assert state_file.client_writes == 0  # not before the loop runs again
        await settled(saver)
        assert state_file.client_writes == 1
        fields = state_file.load().clients["foo"]
        assert (fields["enabled"], fields["timeout"], fields["interval"]) == (
            False, td(minutes=8), td(minutes=1))
        client.enable()
        await settled(saver)
        assert state_file.client_writes == 2  # a later change is a later write
        assert state_file.index_writes == 0  # the set of clients did not change
        saver.close()

    asyncio.run(scenario())


def test_changes_handed_off_while_the_writer_is_busy_are_coalesced(tmp_path, monkeypatch):
    async def scenario():
        registry, state_file, saver = setup_saver(tmp_path, section() + section("bar"))
        release = __import__("threading").Event()
        real_write = state_file.write

        def slow_write(*args, **kwargs):
            release.wait(10)
            real_write(*args, **kwargs)

        monkeypatch.setattr(state_file, "write", slow_write)
        client = registry.clients["foo"]
        client.set_timeout(td(minutes=1))
        for minutes in range(2, 12):  # ten later hand-offs while the first is stuck
            await asyncio.sleep(0.005)
            client.set_timeout(td(minutes=minutes))
            registry.clients["bar"].set_interval(td(seconds=minutes))
        release.set()
        await settled(saver)
        # The first pass, then one pass for all the rest: the latest of each.
        assert state_file.written[0] == "foo.json"
        assert sorted(state_file.written[1:]) == ["bar.json", "foo.json"]
        stored = state_file.load()
        assert stored.clients["foo"]["timeout"] == td(minutes=11)
        assert stored.clients["bar"]["interval"] == td(seconds=11)
        saver.close()

    asyncio.run(scenario())


async def _approval_request(client: Client) -> None:
    task = asyncio.get_running_loop().create_task(client.may_have_secret())
    await asyncio.sleep(0.02)
    task.cancel()


def _failing_checker_run(client: Client) -> None:
    client.start_checker()


CHANGES = {
    # name: (clients.conf settings, change, check of the saved fields)
    "checked_ok": ({}, lambda c, r: c.checked_ok(),
                   lambda f: f["last_checked_ok"] is not None and f["last_checker_status"] == 0),
    "disable": ({}, lambda c, r: c.disable(), lambda f: f["enabled"] is False),
    "enable": ({"enabled": "false"}, lambda c, r: c.enable(),
               lambda f: f["enabled"] is True and f["last_enabled"] is not None),
    "timeout": ({}, lambda c, r: c.set_timeout(td(minutes=9)),
                lambda f: f["timeout"] == td(minutes=9)),
    "interval": ({}, lambda c, r: c.set_interval(td(seconds=30)),
                 lambda f: f["interval"] == td(seconds=30)),
    "secret_sent": ({"extended_timeout": "PT2H"}, lambda c, r: c.secret_sent(),
                    lambda f: f["expires"] - f["created"] > td(hours=1)),
    "approval_request": ({"approval_delay": "PT10S"}, lambda c, r: _approval_request(c),
                         lambda f: f["last_approval_request"] is not None),
    "checker_failed": ({}, lambda c, r: _failing_checker_run(c),
                       lambda f: f["last_checker_status"] == 3),
    "removed": ({}, lambda c, r: r.remove("foo"), None),
    "removed_while_disabled": ({"enabled": "false"}, lambda c, r: r.remove("foo"), None),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_that_matters_is_saved_without_a_flush(tmp_path, change):
    settings, act, check = CHANGES[change]

    async def checker_fails(command: str) -> int:
        return 3 << 8

    async def scenario():
        registry, state_file, saver = setup_saver(
            tmp_path, section(**settings) + section("bar"), checker_fails)
        saver.save_soon()
        saver.flush()
        before = state_file.load()
        writes = (state_file.client_writes, state_file.index_writes, state_file.deletes)
        assert writes == (2, 1, 0)
        result = act(registry.clients["foo"], registry)
        if asyncio.iscoroutine(result):
            await result
        await settled(saver)
        after = state_file.load()
        if check is None:
            assert set(before.clients) == {"foo", "bar"}
            assert set(after.clients) == set(after.previous_config) == {"bar"}
            assert client_files(tmp_path) == ["bar.json"]
            assert (state_file.client_writes, state_file.index_writes,
                    state_file.deletes) == (2, 2, 1)
            assert json.loads((tmp_path / "clients.json").read_text())["clients"] == {
                "bar": "bar.json"}
        else:
            assert not check(before.clients["foo"])
            assert check(after.clients["foo"])
            assert after.clients["bar"] == before.clients["bar"]
            assert (state_file.client_writes, state_file.index_writes,
                    state_file.deletes) == (3, 1, 0)
            assert state_file.written[-1] == "foo.json"

    asyncio.run(scenario())


def test_changes_that_are_not_saved_do_not_write(tmp_path):
    async def scenario():
        registry, state_file, saver = setup_saver(tmp_path)
        client = registry.clients["foo"]
        client.set_secret(b"new secret")
        client.approve(True)
        await asyncio.sleep(0.05)
        assert not saver.pending
        assert state_file.client_writes == state_file.index_writes == 0

    asyncio.run(scenario())


def test_flush_writes_at_once_and_replaces_the_scheduled_hand_off(tmp_path):
    async def scenario():
        registry, state_file, saver = setup_saver(tmp_path)
        registry.clients["foo"].disable()
        assert saver.flush()
        assert not saver.pending
        assert (state_file.client_writes, state_file.index_writes) == (1, 1)
        assert state_file.load().clients["foo"]["enabled"] is False
        await asyncio.sleep(0.05)
        assert (state_file.client_writes, state_file.index_writes) == (1, 1)

    asyncio.run(scenario())


def test_save_soon_writes_every_client_and_the_index(tmp_path):
    async def scenario():
        registry, state_file, saver = setup_saver(tmp_path, section() + section("bar"))
        client_path(tmp_path, "gone").parent.mkdir()
        client_path(tmp_path, "gone").write_text("{}")  # a client no longer configured
        saver.save_soon()
        await settled(saver)
        assert (state_file.client_writes, state_file.index_writes) == (2, 1)
        assert client_files(tmp_path) == ["bar.json", "foo.json"]
        saver.close()

    asyncio.run(scenario())


def test_clients_added_later_are_followed(tmp_path):
    async def scenario():
        registry, state_file, saver = setup_saver(tmp_path)
        late = make_client(config("late"))
        registry.add(late)
        await settled(saver)
        assert "late" in state_file.load().clients
        assert "late" in json.loads((tmp_path / "clients.json").read_text())["clients"]
        late.disable()
        await settled(saver)
        assert state_file.load().clients["late"]["enabled"] is False
        assert (state_file.client_writes, state_file.index_writes) == (2, 1)

    asyncio.run(scenario())


def test_close_saves_what_is_pending_then_stops_following(tmp_path):
    async def scenario():
        registry, state_file, saver = setup_saver(tmp_path)
        client = registry.clients["foo"]
        client.set_timeout(td(minutes=6))
        saver.close()
        assert state_file.client_writes == 1
        assert saver not in client.observers and saver not in registry.observers
        assert saver._thread is not None and not saver._thread.is_alive()
        client.disable()  # shutdown disables clients: that is not saved
        await asyncio.sleep(0.05)
        assert state_file.client_writes == 1
        assert state_file.load().clients["foo"]["enabled"] is True
        assert saver.flush()  # nothing owed, and no writer to wait for

    asyncio.run(scenario())


def test_a_failed_save_is_a_warning_and_is_retried_by_flush(tmp_path, caplog):
    async def scenario():
        registry, state_file, saver = setup_saver(tmp_path / "missing")
        registry.clients["foo"].disable()
        deadline = time.monotonic() + 10
        while not any("Could not save persistent state" in m for m in warnings_of(caplog)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert saver.pending
        assert not saver.flush()  # still failing
        (tmp_path / "missing").mkdir()
        assert saver.flush()
        assert not saver.pending
        assert state_file.load().clients["foo"]["enabled"] is False
        saver.close()

    asyncio.run(scenario())


def test_without_an_event_loop_a_change_is_handed_off_at_once(tmp_path):
    registry, state_file, saver = setup_saver(tmp_path)
    registry.clients["foo"].set_setting("host", "elsewhere.example")
    deadline = time.monotonic() + 10
    while saver.pending:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert state_file.load().clients["foo"]["host"] == "elsewhere.example"
    assert saver.flush()
    saver.close()


def test_with_1000_clients_a_change_writes_one_file_and_costs_the_loop_little(tmp_path):
    count = 1000
    text = "".join(section(f"client{i:04}") for i in range(count))

    async def scenario():
        registry, state_file, saver = setup_saver(tmp_path, text)
        saver.save_soon()
        await settled(saver, timeout=60)
        assert (state_file.client_writes, state_file.index_writes) == (count, 1)
        loop_times = []
        real_hand_off = saver._hand_off

        def timed_hand_off():
            started = time.perf_counter()
            real_hand_off()
            loop_times.append(time.perf_counter() - started)

        saver._hand_off = timed_hand_off
        rounds = 20
        for round_number in range(rounds):
            client = registry.clients[f"client{round_number * 37 % count:04}"]
            started = time.perf_counter()
            client.checked_ok()  # status, last_checked_ok and expiry: one write
            loop_times.append(time.perf_counter() - started)
            await settled(saver)
        writes = state_file.client_writes - count
        assert writes == rounds
        assert state_file.written[count:] == [
            f"client{r * 37 % count:04}.json" for r in range(rounds)]
        assert state_file.index_writes == 1
        # Loose: the loop only snapshots one client (well under a millisecond
        # normally); the encoding and the writing happen in the writer thread.
        per_change = sum(loop_times) / rounds
        assert per_change < 0.005, f"{per_change * 1000:.2f} ms of event loop per change"
        saver.close()

    asyncio.run(scenario())


KILL_CHILD = textwrap.dedent("""
    import asyncio, datetime, sys, time
    from mandos.server import clients_conf, state
    from mandos.server.client import Client
    from mandos.server.registry import ClientRegistry

    statedir, change, text = sys.argv[1:4]

    async def runner(command):
        return 0

    async def settled(saver):
        await asyncio.sleep(0)
        while saver.pending:
            await asyncio.sleep(0.001)

    async def main():
        configs = {c.name: c for c in clients_conf.parse(text)}
        registry = ClientRegistry()
        saver = state.StateSaver(state.StateFile(statedir), registry, configs)
        for c in configs.values():
            registry.add(Client(c, runner))
        await settled(saver)
        client = registry.clients["foo"]
        if change == "checked_ok":
            client.checked_ok()
        elif change == "disable":
            client.disable()
        elif change == "timeout":
            client.set_timeout(datetime.timedelta(minutes=9))
        elif change == "remove":
            registry.remove("foo")
        await settled(saver)  # the writer reports it written
        print("changed", flush=True)
        time.sleep(60)  # blocks the loop: nothing more is saved before the kill

    asyncio.run(main())
""")


@pytest.mark.parametrize("change", ["checked_ok", "disable", "timeout", "remove"])
def test_kill_9_right_after_a_change_loses_nothing(tmp_path, change):
    text = section() + section("bar")
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(tmp_path), change, text],
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline() == b"changed\n"
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    stored = state.StateFile(str(tmp_path)).load()
    if change == "remove":
        assert set(stored.clients) == {"bar"}
        return
    fields = stored.clients["foo"]
    if change == "checked_ok":
        assert fields["last_checked_ok"] is not None and fields["last_checker_status"] == 0
    elif change == "disable":
        assert fields["enabled"] is False
    else:
        assert fields["timeout"] == td(minutes=9)


# -- merging at start-up (§10.3) ----------------------------------------------

RUNTIME_EDITS = [
    # setting, attribute, previous text, new text, run-time value, new value
    ("host", "host", "old.example", "new.example", "runtime.example", "new.example"),
    ("checker", "checker_command", "true", "false", "exit 7", "false"),
    ("timeout", "timeout", "PT5M", "PT7M", td(minutes=10), td(minutes=7)),
    ("extended_timeout", "extended_timeout", "PT15M", "PT20M", td(hours=1), td(minutes=20)),
    ("interval", "interval", "PT2M", "PT3M", td(minutes=1), td(minutes=3)),
    ("approval_delay", "approval_delay", "PT0S", "PT10S", td(seconds=30), td(seconds=10)),
    ("approval_duration", "approval_duration", "PT1S", "PT2S", td(seconds=5), td(seconds=2)),
    ("approved_by_default", "approved_by_default", "False", "True", False, True),
    ("enabled", "enabled", "False", "True", False, True),
]


@pytest.mark.parametrize("key, attribute, old, new, runtime, expected", RUNTIME_EDITS,
                         ids=[row[0] for row in RUNTIME_EDITS])
def test_a_setting_edited_in_clients_conf_wins(key, attribute, old, new, runtime, expected):
    stored = stored_state(config(**{key: new}), previous=config(**{key: old}),
                          **{attribute: runtime})
    [(merged, _)] = state.merge([config(**{key: new})], stored, NOW)
    assert getattr(merged, attribute) == expected


RUNTIME_KEPT = [
    # setting, attribute, text (unchanged), run-time value
    ("host", "host", "old.example", "runtime.example"),
    ("checker", "checker_command", "true", "exit 7"),
    ("timeout", "timeout", "PT5M", td(minutes=10)),
    ("extended_timeout", "extended_timeout", "PT15M", td(hours=1)),
    ("interval", "interval", "PT2M", td(minutes=1)),
    ("approval_delay", "approval_delay", "PT0S", td(seconds=30)),
    ("approval_duration", "approval_duration", "PT1S", td(seconds=5)),
    ("approved_by_default", "approved_by_default", "True", False),
    ("enabled", "enabled", "True", False),
]


@pytest.mark.parametrize("key, attribute, text, runtime", RUNTIME_KEPT,
                         ids=[row[0] for row in RUNTIME_KEPT])
def test_a_runtime_change_is_kept_when_the_setting_was_not_edited(key, attribute, text, runtime):
    cfg = config(**{key: text})
    [(merged, _)] = state.merge([cfg], stored_state(cfg, **{attribute: runtime}), NOW)
    assert getattr(merged, attribute) == runtime


@pytest.mark.parametrize("key, old, new", [
    ("timeout", "5m", "PT5M"), ("interval", "PT120S", "PT2M"),
    ("approved_by_default", "yes", "True"), ("enabled", "on", "1"),
])
def test_rewriting_a_setting_with_the_same_value_keeps_the_runtime_change(key, old, new):
    attribute = state.RUNTIME_SETTINGS[key]
    runtime = False if key in ("approved_by_default", "enabled") else td(minutes=42)
    stored = stored_state(config(**{key: new}), previous=config(**{key: old}),
                          **{attribute: runtime})
    [(merged, _)] = state.merge([config(**{key: new})], stored, NOW)
    assert getattr(merged, attribute) == runtime


def test_key_id_and_secret_come_from_the_new_configuration():
    new = clients_conf.parse(section(secret=b"new secret").replace(KEY_ID, "CD" * 32))[0]
    [(merged, _)] = state.merge([new], stored_state(new, previous=config()), NOW)
    assert (merged.key_id, merged.secret) == ("CD" * 32, b"new secret")


def test_enabled_client_not_expired_keeps_its_timestamps():
    cfg = config()
    stored = stored_state(cfg)
    [(merged, fields)] = state.merge([cfg], stored, NOW)
    assert merged.enabled
    assert fields == {name: stored.clients["foo"][name] for name in state.RESTORED_FIELDS}


def test_expired_while_down_and_never_checked_ok_is_disabled(caplog):
    cfg = config()
    stored = stored_state(cfg, expires=NOW - td(seconds=1), last_checked_ok=None,
                          last_checker_status=-2)
    [(merged, fields)] = state.merge([cfg], stored, NOW)
    assert not merged.enabled
    assert fields["expires"] is fields["last_enabled"] is None
    assert any("never checked successfully" in m for m in warnings_of(caplog))


def test_expired_while_down_after_a_failed_check_is_disabled(caplog):
    cfg = config()
    stored = stored_state(cfg, expires=NOW, last_checker_status=4)
    [(merged, fields)] = state.merge([cfg], stored, NOW)
    assert not merged.enabled
    assert fields["expires"] is fields["last_enabled"] is None
    assert fields["last_checker_status"] == 4
    assert any("status 4" in m for m in warnings_of(caplog))


def test_expired_while_down_after_a_good_check_stays_enabled_for_a_timeout(caplog):
    cfg = config(timeout="PT7M")
    stored = stored_state(cfg, expires=NOW - td(days=3))
    [(merged, fields)] = state.merge([cfg], stored, NOW)
    assert merged.enabled
    assert fields["expires"] == NOW + td(minutes=7)
    assert fields["last_enabled"] == stored.clients["foo"]["last_enabled"]
    assert not warnings_of(caplog)


def test_client_removed_at_runtime_but_still_configured_comes_back():
    # Deliberate fix of the original's quirk (SERVER.md §10.3 step 6, §19.7).
    foo, bar = config("foo"), config("bar")
    stored = stored_state(foo)
    stored.previous_config["bar"] = dict(bar.settings)  # configured, but removed at run time
    result = dict((c.name, (c, f)) for c, f in state.merge([foo, bar], stored, NOW))
    assert set(result) == {"foo", "bar"}
    assert result["bar"] == (bar, {})  # fresh from clients.conf


def test_names_gone_from_the_configuration_are_dropped():
    foo, bar = config("foo"), config("bar")
    stored = stored_state(foo)
    stored.clients.update(stored_state(bar).clients)
    stored.previous_config.update(stored_state(bar).previous_config)
    assert [c.name for c, _ in state.merge([bar], stored, NOW)] == ["bar"]


def test_new_names_start_fresh_even_with_state_under_that_name():
    foo, bar = config("foo"), config("bar", timeout="PT9M")
    stored = stored_state(foo)
    # State under "bar" but "bar" was not in the previous configuration.
    stored.clients["bar"] = dict(stored.clients["foo"], timeout=td(minutes=1))
    merged = state.merge([foo, bar], stored, NOW)
    assert [c.name for c, _ in merged] == ["foo", "bar"]
    assert merged[1] == (bar, {})
    assert merged[1][0].timeout == td(minutes=9)


def test_no_stored_state_means_every_client_is_fresh():
    configs = [config("foo"), config("bar")]
    assert state.merge(configs, None, NOW) == [(c, {}) for c in configs]


def test_created_and_checker_history_are_kept():
    cfg = config()
    created = NOW - td(days=999)
    stored = stored_state(cfg, created=created, last_checker_status=0,
                          last_approval_request=NOW - td(hours=1))
    [(_, fields)] = state.merge([cfg], stored, NOW)
    assert fields["created"] == created
    assert fields["last_checked_ok"] == NOW - td(minutes=2)
    assert fields["last_approval_request"] == NOW - td(hours=1)


def test_disabled_client_has_no_last_enabled_or_expiry():
    cfg = config()
    stored = stored_state(cfg, enabled=False, last_enabled=NOW - td(days=1),
                          expires=NOW + td(days=1))
    [(merged, fields)] = state.merge([cfg], stored, NOW)
    assert not merged.enabled
    assert fields["last_enabled"] is fields["expires"] is None


def test_disabled_in_clients_conf_clears_the_timestamps():
    stored = stored_state(config(enabled="false"), previous=config())
    [(merged, fields)] = state.merge([config(enabled="false")], stored, NOW)
    assert not merged.enabled
    assert fields["last_enabled"] is fields["expires"] is None


def test_enabled_in_clients_conf_starts_as_just_enabled():
    stored = stored_state(config(), previous=config(enabled="false"), enabled=False,
                          last_enabled=None, expires=None, last_checked_ok=None,
                          last_checker_status=-2)
    [(merged, fields)] = state.merge([config(timeout="PT4M")], stored, NOW)
    assert merged.enabled
    assert fields["last_enabled"] == NOW
    assert fields["expires"] == NOW + td(minutes=4)


def test_merge_keeps_the_new_settings_text_for_the_next_save():
    new = config(timeout="PT7M")
    [(merged, _)] = state.merge([new], stored_state(new, previous=config()), NOW)
    assert merged.settings == new.settings
    assert merged.settings is not new.settings


# -- apply ------------------------------------------------------------------

class Recorder(ClientObserver):
    def __init__(self) -> None:
        self.events = []

    def property_changed(self, client, name) -> None:
        self.events.append(name)

    def client_signal(self, client, signal, *args) -> None:
        self.events.append(signal)


def test_apply_restores_fields_without_notifications_and_resets_runtime_only_fields():
    cfg = config()
    stored = stored_state(cfg, last_checker_status=5, last_approval_request=NOW)
    [(merged, fields)] = state.merge([cfg], stored, NOW)
    client = make_client(merged, now=NOW + td(days=1))
    recorder = Recorder()
    client.observers.append(recorder)
    state.apply(client, fields)
    assert recorder.events == []
    for name in state.RESTORED_FIELDS:
        assert getattr(client, name) == fields[name]
    assert (client.approved, client.approvals_pending, client.checker_running) == (None, 0, False)


def test_apply_refuses_unknown_fields():
    with pytest.raises(KeyError):
        state.apply(make_client(config()), {"secret": b"x"})


def test_restart_restores_runtime_changes(tmp_path):
    text = section(timeout="PT5M") + section("bar", enabled="false")

    async def first_run():
        registry, state_file, saver = setup_saver(tmp_path, text)
        registry.clients["foo"].set_timeout(td(minutes=10))
        registry.clients["foo"].checked_ok()
        registry.clients["bar"].enable()
        saver.flush()
        saver.close()
        return {c.name: (c.created, c.last_checked_ok, c.expires) for c in registry}

    before = asyncio.run(first_run())
    stored = state.StateFile(str(tmp_path)).load()
    clients = {}
    for merged, fields in state.merge(clients_conf.parse(text), stored, utcnow()):
        clients[merged.name] = make_client(merged)
        state.apply(clients[merged.name], fields)
    foo, bar = clients["foo"], clients["bar"]
    assert foo.timeout == td(minutes=10)
    assert (foo.created, foo.last_checked_ok, foo.expires) == before["foo"]
    assert bar.enabled and bar.created == before["bar"][0]
    assert client_files(tmp_path) == ["bar.json", "foo.json"]  # kept, not deleted at start-up


def test_merge_uses_the_current_time_by_default():
    cfg = config(timeout="PT7M")
    stored = stored_state(cfg, expires=datetime.datetime(2000, 1, 1))
    before = utcnow()
    [(_, fields)] = state.merge([cfg], stored)
    assert before + td(minutes=7) <= fields["expires"] <= utcnow() + td(minutes=7)

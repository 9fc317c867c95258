"""Differential tests: our plugin-runner against Debian's original (1.8.16).

Both runners are started as root on the same plugin directory, with the same
configuration file, command line, environment and standard input; their
exit status and standard output (byte for byte) must be equal.  Both drop
to uid 65534 before they look at the plugin directory, so every file the
plugins need lives below a 0755 temporary folder.

Standard input is a regular file holding ``FALLBACK_LINE``: when a runner
falls back to its password prompt (no terminal: it reads standard input) it
prints that line, so a fallback can never pass for a plugin that won with
empty output.  A regular file also means that nothing can block on stdin.
The runners get a new session (no controlling terminal) and a timeout.

Each case is one ``Case`` row in ``CASES``.  To add one, append a row:
plugin files (name -> content and mode), the configuration file's content
(or None: the file does not exist; ``--config-file`` is always given so the
host's ``/conf/...`` is never read), and the command-line arguments.
Placeholders ``@TMP@``, ``@PLUGINS@``, ``@CONFIG@`` and ``@OUT@`` (a
world-writable folder the plugins may write to) are replaced in arguments,
configuration text, plugin contents, symlink targets and environment values.

Rows with ``deviation`` describe a deliberate difference: the original is
not run and our output is checked against ``expect_*`` only.  Rows with
``bug`` are known differences that are bugs in our runner (strict xfail).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
OUR_RUNNER = REPO / "bin" / "plugin-runner"
NOBODY = 65534
FALLBACK_LINE = b"typed-at-fallback-prompt"
DASH = os.path.realpath("/bin/sh")
BASE_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    # A set locale keeps the interpreter from adding LC_CTYPE by itself
    # (that difference has its own case, "env-no-locale-vars").
    "LANG": "C.UTF-8",
    "INHERITED": "from-caller",
}

HANG_QUIRK = ("CLIENT.md §1.9 '(quirk, do not copy)': the original keeps records of "
              "never-started plugins and hangs when every started plugin fails")


# --------------------------------------------------------------------------
# Directory entries

@dataclasses.dataclass(frozen=True)
class File:
    content: str | bytes
    mode: int = 0o755
    owner: tuple[int, int] | None = None  # (uid, gid); default root


@dataclasses.dataclass(frozen=True)
class Copy:
    source: str
    mode: int = 0o755
    owner: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Dir:
    mode: int = 0o755


@dataclasses.dataclass(frozen=True)
class Link:
    target: str


@dataclasses.dataclass(frozen=True)
class Fifo:
    mode: int = 0o666


Entry = File | Copy | Dir | Link | Fifo


def sh(body: str, mode: int = 0o755, owner: tuple[int, int] | None = None) -> File:
    """A /bin/sh plugin.  (Its $0 is /dev/fd/N under the original: never print it.)"""
    return File("#!/bin/sh\n" + body + "\n", mode, owner)


# Prints its arguments and a few variables ("(unset)" when not set).
REVEAL = sh(r"""printf 'argc=%s' "$#"; printf ' [%s]' "$@"; printf '\n'
printf '%s=%s\n' FOO "${FOO-(unset)}" BAR "${BAR-(unset)}" \
    MANDOSPLUGINHELPERDIR "${MANDOSPLUGINHELPERDIR-(unset)}" \
    INHERITED "${INHERITED-(unset)}"
printf 'uid=%s gid=%s groups=%s\n' "$(id -u)" "$(id -g)" "$(id -G)"
""")
IDS = sh('printf "%s/%s/%s" "$(id -u)" "$(id -g)" "$(id -G)"')
ENV_DUMP = sh("env | LC_ALL=C sort")


def ok(text: str, delay: float = 0) -> File:
    pause = f"sleep {delay}; " if delay else ""
    return sh(f"{pause}printf '%s' '{text}'")


def fail(code: int = 1, text: str = "output of a failed plugin") -> File:
    return sh(f"printf '%s' '{text}'; exit {code}")


def log_and_fail(tag: str, mode: int = 0o755) -> File:
    """Record that it ran in @OUT@/started.log, then fail."""
    return sh(f"echo '{tag}' >> @OUT@/started.log; exit 1", mode)


BLOB = bytes(range(256)) * 5 + b"\0\n\0"
BIG = hashlib.shake_256(b"plugin-runner").digest(1 << 20)


# --------------------------------------------------------------------------
# Cases

@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    plugins: Mapping[str, Entry] | None = dataclasses.field(default_factory=dict)
    args: tuple[str | bytes, ...] = ()
    config: str | bytes | None = None
    # Prefix the arguments with --config-file=@CONFIG@ --plugin-dir=@PLUGINS@.
    defaults: bool = True
    files: Mapping[str, Entry] = dataclasses.field(default_factory=dict)  # below @TMP@
    env: Mapping[str, str | bytes | None] = dataclasses.field(default_factory=dict)
    # Bytes: a regular file with them; None: /dev/null; HOLD: a pipe that stays empty.
    stdin: bytes | None | object = FALLBACK_LINE + b"\n"
    # What the specification says (checked for both runners when compared).
    expect_status: int | None = None
    expect_stdout: bytes | Callable[[bytes], bool] | None = None
    # "exact": status and stdout equal; "status": equal status, both stdout non-empty.
    compare: str = "exact"
    observe: tuple[str, ...] = ()  # files below @OUT@ compared too (as sorted lines)
    extra_groups: tuple[int, ...] = ()
    ignore_signals: tuple[int, ...] = ()  # ignored by the runner's caller
    # (file below @OUT@ to wait for, or seconds to wait; signal sent to the runner)
    signal_when: tuple[str | float, int] | None = None
    expect_no_leftover: bool = False
    nosuid: bool = False  # the plugin directory is a tmpfs mounted nosuid
    timeout: float = 10.0
    deviation: str | None = None  # original not run: the reason
    bug: str | None = None  # difference that is a bug of ours: strict xfail


FALLBACK = FALLBACK_LINE  # what a runner prints when it falls back
HOLD = object()  # stdin: a pipe that never delivers anything

CASES: list[Case] = [
    # ---- basics -----------------------------------------------------------
    Case("single-plugin", {"p": REVEAL}, expect_status=0),
    Case("winner-output-exact", {"p": ok("s3cret")}, expect_status=0, expect_stdout=b"s3cret"),
    Case("empty-dir", {}, expect_status=0, expect_stdout=FALLBACK),
    Case("empty-dir-devnull", {}, stdin=None, expect_status=0, expect_stdout=b""),
    Case("missing-plugin-dir", None, expect_status=69, expect_stdout=FALLBACK),
    Case("plugin-dir-is-a-file", {}, defaults=False,
         args=("--config-file=@CONFIG@", "--plugin-dir=@TMP@/plugins.d/f"),
         files={"plugins.d/f": ok("x")}, expect_stdout=FALLBACK),
    Case("plugin-dir-unreadable-by-65534", {"p": ok("x")}, files={"plugins.d": Dir(0o700)},
         expect_status=69, expect_stdout=FALLBACK),
    Case("plugin-dir-unreadable-but-userid-0", {"p": IDS}, files={"plugins.d": Dir(0o700)},
         args=("--userid=0", "--groupid=0"), expect_status=0, expect_stdout=b"0/0/0"),
    Case("plugin-dir-relative", {"p": ok("rel")}, defaults=False,
         args=("--config-file=@CONFIG@", "--plugin-dir=plugins.d"), expect_stdout=b"rel"),
    Case("plugin-dir-via-symlink", {"p": ok("vialink")}, defaults=False,
         files={"dirlink": Link("@PLUGINS@")},
         args=("--config-file=@CONFIG@", "--plugin-dir=@TMP@/dirlink"), expect_stdout=b"vialink"),
    Case("plugin-dir-last-wins", {"p": ok("right")},
         files={"other/p": ok("wrong")}, defaults=False,
         args=("--config-file=@CONFIG@", "--plugin-dir=@TMP@/other", "--plugin-dir=@PLUGINS@"),
         expect_stdout=b"right"),

    # ---- option forms -----------------------------------------------------
    Case("long-inline", {"p": REVEAL}, args=("--global-options=a,b", "--options-for=p:c")),
    Case("long-separate", {"p": REVEAL}, args=("--global-options", "a,b", "--options-for", "p:c")),
    Case("short-separate", {"p": REVEAL}, args=("-g", "a,b", "-o", "p:c")),
    Case("short-attached", {"p": REVEAL}, args=("-ga,b", "-op:c", "-GFOO=1", "-Ep:BAR=2")),
    Case("long-prefixes", {"p": REVEAL},
         args=("--global-o=a", "--opt", "p:c", "--global-e=FOO=1", "--env=p:BAR=2",
               "--plugin-h=/helpers", "--deb")),
    Case("long-exact-beats-prefix", {"p": REVEAL}, defaults=False,
         args=("--config-file=@CONFIG@", "--plugin-dir", "@PLUGINS@")),
    Case("ambiguous-prefix", {"p": REVEAL}, args=("--glob=x",), expect_status=64,
         expect_stdout=FALLBACK),
    Case("ambiguous-prefix-plugin", {"p": REVEAL}, args=("--plugin-=x",), expect_status=64),
    Case("unknown-long", {"p": REVEAL}, args=("--bogus",), expect_status=64,
         expect_stdout=FALLBACK),
    Case("unknown-short", {"p": REVEAL}, args=("-x",), expect_status=64),
    Case("missing-arg-long", {"p": REVEAL}, args=("--global-options",), expect_status=64),
    Case("missing-arg-short", {"p": REVEAL}, args=("-d",), expect_status=64),
    Case("flag-with-value", {"p": REVEAL}, args=("--debug=yes",), expect_status=64),
    Case("short-value-is-letter", {"p": REVEAL}, args=("-dV",), expect_status=0),
    Case("debug-keeps-stdout", {"p": REVEAL}, args=("--debug", "-g", "x"), expect_status=0),
    Case("positional-non-empty", {"p": REVEAL}, args=("keyfile",), expect_status=64,
         expect_stdout=FALLBACK),
    Case("positional-dash", {"p": REVEAL}, args=("-",), expect_status=64),
    Case("double-dash-then-option", {"p": REVEAL}, args=("--", "-g"), expect_status=64),
    Case("double-dash-then-empty", {"p": REVEAL}, args=("--", ""), expect_status=0),
    Case("empty-positional-first", {"p": REVEAL}, defaults=False,
         args=("", "--config-file=@CONFIG@", "--plugin-dir=@PLUGINS@", "-g", "x"),
         expect_status=0),
    Case("empty-positional-last", {"p": REVEAL}, args=("-g", "x", ""), expect_status=0),
    Case("empty-positional-twice", {"p": REVEAL}, args=("", "-gx", "")),
    Case("empty-long-name", {"p": REVEAL}, args=("--=x",), expect_status=64),
    Case("non-utf8-arguments", {"p": REVEAL},
         args=(b"-g\xff\xfe,caf\xc3\xa9", b"-Ep:FOO=\x80", b"-o", b"p:\xc0")),

    # ---- comma lists ------------------------------------------------------
    Case("comma-empty-elements", {"p": REVEAL}, args=("-g", ",a,,b,", "-o", "p:")),
    Case("comma-only", {"p": REVEAL}, args=("-g", ",", "-g", "")),
    Case("global-options-empty-inline", {"p": REVEAL}, args=("--global-options=",)),
    Case("options-for-first-colon", {"p": REVEAL}, args=("-o", "p:a:b,c:d")),
    Case("options-with-spaces", {"p": REVEAL}, args=("-o", "p:--x y", "-g", " lead,trail ")),
    Case("options-for-other-plugin", {"p": REVEAL}, args=("-o", "q:nope", "-o", "pp:nope")),
    Case("options-for-no-colon", {"p": REVEAL}, args=("-o", "p"), expect_status=64),
    Case("options-for-empty-name", {"p": REVEAL}, args=("-o", ":x"), expect_status=64),
    Case("env-for-no-colon", {"p": REVEAL}, args=("-E", "FOO=1"), expect_status=64),
    Case("env-for-empty-name", {"p": REVEAL}, args=("-E", ":FOO=1"), expect_status=64),

    # ---- -o / -g ordering ----------------------------------------------------
    Case("order-own-before-global", {"p": REVEAL},
         args=("-g", "g1", "-o", "p:o1", "-g", "g2,g3", "-o", "p:o2")),
    Case("order-file-before-command-line", {"p": REVEAL},
         config="-g fg1 -o p:fo1\n--global-options=fg2\n",
         args=("-o", "p:co1", "-g", "cg1")),

    # ---- environment ------------------------------------------------------
    Case("env-global", {"p": REVEAL}, args=("-G", "FOO=g")),
    Case("env-for-beats-global", {"p": REVEAL}, args=("-E", "p:FOO=own", "-G", "FOO=global")),
    Case("env-global-after-env-for", {"p": REVEAL}, args=("-G", "FOO=global", "-E", "p:FOO=own")),
    Case("env-for-other-plugin", {"p": REVEAL}, args=("-E", "q:FOO=other", "-G", "FOO=global")),
    Case("env-global-later-replaces", {"p": REVEAL}, args=("-G", "FOO=1", "-G", "FOO=2")),
    Case("env-for-later-replaces", {"p": REVEAL}, args=("-E", "p:FOO=1", "-E", "p:FOO=2")),
    Case("env-global-beats-inherited", {"p": REVEAL}, args=("-G", "INHERITED=global")),
    Case("env-for-beats-inherited", {"p": REVEAL}, args=("-E", "p:INHERITED=own")),
    Case("env-inherited", {"p": REVEAL}, env={"FOO": "inh-foo", "BAR": ""}),
    Case("env-empty-value", {"p": REVEAL}, args=("-G", "FOO=", "-E", "p:BAR=")),
    Case("env-value-with-equals-and-comma", {"p": REVEAL},
         args=("-G", "FOO=a=b,c", "-E", "p:BAR=x:y")),
    Case("env-non-utf8-inherited", {"p": REVEAL}, env={"FOO": b"\xff\xfe"}),
    Case("env-no-name", {"p": REVEAL}, args=("-G", "=x", "-E", "p:=y")),
    Case("env-no-equals-shell-view", {"p": REVEAL}, args=("-G", "FOO", "-E", "p:BAR")),
    Case("helper-dir-default", {"p": REVEAL}),
    Case("helper-dir-option", {"p": REVEAL}, args=("--plugin-helper-dir", "/h/one")),
    Case("helper-dir-last-wins", {"p": REVEAL},
         config="--plugin-helper-dir=/from/file\n",
         args=("--plugin-helper-dir=/h/one", "--plugin-helper-dir=/h/two")),
    Case("helper-dir-beats-global-env", {"p": REVEAL},
         args=("-G", "MANDOSPLUGINHELPERDIR=/from/G", "--plugin-helper-dir=/h")),
    Case("helper-dir-global-env-after", {"p": REVEAL},
         args=("--plugin-helper-dir=/h", "-G", "MANDOSPLUGINHELPERDIR=/from/G")),
    Case("helper-dir-env-for-wins", {"p": REVEAL},
         args=("--plugin-helper-dir=/h", "-E", "p:MANDOSPLUGINHELPERDIR=/own")),
    Case("helper-dir-beats-inherited", {"p": REVEAL}, env={"MANDOSPLUGINHELPERDIR": "/inh"}),
    Case("crypttab-variables", {"p": sh("env | grep '^CRYPTTAB_' | LC_ALL=C sort")},
         env={"CRYPTTAB_NAME": "sda5_crypt", "CRYPTTAB_SOURCE": "/dev/sda5",
              "CRYPTTAB_KEY": "none",
              "CRYPTTAB_OPTIONS": "luks,keyscript=/lib/mandos/plugin-runner",
              "CRYPTTAB_TRIED": "0"},
         args=("",), expect_stdout=b"CRYPTTAB_KEY=none\nCRYPTTAB_NAME=sda5_crypt\n"
         b"CRYPTTAB_OPTIONS=luks,keyscript=/lib/mandos/plugin-runner\n"
         b"CRYPTTAB_SOURCE=/dev/sda5\nCRYPTTAB_TRIED=0\n"),
    Case("env-full-dump", {"p": ENV_DUMP}, args=("-G", "FOO=1", "-E", "p:BAR=2")),
    Case("env-no-locale-vars", {"p": ENV_DUMP}, env={"LANG": None}),

    # ---- configuration file -------------------------------------------------
    Case("config-comments", {"p": REVEAL},
         config="# a comment line\n-g a#trailing comment\n  -g   b # more\n#-g never\n\n"
                "-g c#\n-g d\n"),
    Case("config-whitespace-kinds", {"p": REVEAL},
         config="-g\tx\v-g\fy\r\n-G FOO=1\r\n  \t\n--global-options\nz\n"),
    Case("config-value-on-next-line", {"p": REVEAL},
         config="-o\np:nextline\n--global-env\nFOO=2\n"),
    Case("config-short-attached-and-prefix", {"p": REVEAL},
         config="-gx -Ep:FOO=e --glob-o=y --env-f=p:BAR=b\n"),
    Case("config-empty-file", {"p": REVEAL}, config=""),
    Case("config-only-comments", {"p": REVEAL}, config="# nothing\n   # here\n"),
    Case("config-no-final-newline", {"p": REVEAL}, config="-g last"),
    Case("config-non-utf8", {"p": REVEAL}, config=b"-g \xff\xfe -Ep:FOO=caf\xc3\xa9\n"),
    Case("config-file-option-inside-ignored", {"p": REVEAL},
         files={"other.conf": File("-g from-other\n", 0o644)},
         config="--config-file=@TMP@/other.conf\n-g from-main\n"),
    Case("config-file-last-on-command-line", {"p": REVEAL}, defaults=False,
         files={"first.conf": File("-g from-first\n", 0o644)},
         config="-g from-second\n",
         args=("--config-file=@TMP@/first.conf", "--plugin-dir=@PLUGINS@",
               "--config-file", "@CONFIG@")),
    Case("config-file-prefix-option", {"p": REVEAL}, defaults=False, config="-g via-prefix\n",
         args=("--config=@CONFIG@", "--plugin-dir=@PLUGINS@")),
    Case("config-sets-plugin-dir", {"p": ok("from-config-dir")}, defaults=False,
         config="--plugin-dir=@PLUGINS@\n", args=("--config-file=@CONFIG@",),
         expect_stdout=b"from-config-dir"),
    Case("config-plugin-dir-overridden", {"p": ok("command-line-dir")},
         config="--plugin-dir=@TMP@/nowhere\n", expect_stdout=b"command-line-dir"),
    Case("config-plugin-dir-wins-over-nothing", {"p": ok("x")}, defaults=False,
         config="--plugin-dir=@PLUGINS@\n",
         args=("--config-file=@CONFIG@", "--plugin-dir=@TMP@/nowhere"), expect_status=69),
    Case("config-error-unknown", {"p": REVEAL}, config="--bogus\n", expect_status=78,
         expect_stdout=FALLBACK),
    Case("config-error-short", {"p": REVEAL}, config="-x\n", expect_status=78),
    Case("config-error-no-colon", {"p": REVEAL}, config="-o p\n", expect_status=78),
    Case("config-error-missing-arg", {"p": REVEAL}, config="-g a\n--plugin-dir\n",
         expect_status=78),
    Case("config-error-positional", {"p": REVEAL}, config="stray\n", expect_status=78),
    Case("config-error-quotes-are-literal", {"p": REVEAL}, config='""\n', expect_status=78),
    Case("config-error-beats-usage-error", {"p": REVEAL}, config="--bogus\n",
         args=("--also-bogus",), expect_status=64),
    Case("config-error-then-positional", {"p": REVEAL}, config="--bogus\n", args=("keyfile",),
         expect_status=78),
    Case("config-is-a-directory", {"p": REVEAL}, defaults=False,
         args=("--config-file=@TMP@", "--plugin-dir=@PLUGINS@"), expect_status=0),
    Case("config-double-dash-then-empty-ok", {"p": REVEAL}, config="-g a --\n"),
    Case("config-double-dash-then-option", {"p": REVEAL}, config="-- -g b\n", expect_status=78),
    Case("config-userid", {"p": IDS}, config="--userid=1000 --groupid 1001\n",
         expect_stdout=b"1000/1001/1001"),

    # ---- disable / enable -------------------------------------------------------
    Case("disable-one", {"a": ok("from-a"), "b": REVEAL}, args=("-d", "a")),
    Case("disable-then-enable", {"a": fail(), "b": ok("b-wins", 0.3)},
         args=("--disable=b", "--enable=b"), expect_stdout=b"b-wins"),
    Case("enable-then-disable", {"a": ok("a-wins", 0.2), "b": ok("b-wins")},
         args=("-e", "b", "-d", "b"), expect_stdout=b"a-wins"),
    Case("disable-in-config-enable-on-command-line", {"a": fail(), "b": ok("b", 0.3)},
         config="--disable=b\n", args=("--enable", "b"), expect_stdout=b"b"),
    Case("enable-in-config-disable-on-command-line", {"a": ok("a", 0.3), "b": ok("b")},
         config="-e b\n", args=("-d", "b"), expect_stdout=b"a"),
    Case("disable-all", {"a": ok("a"), "b": ok("b")}, args=("-d", "a", "-db"),
         expect_status=0, expect_stdout=FALLBACK),
    Case("disable-unknown-name", {"p": REVEAL}, args=("-d", "ghost", "-e", "phantom")),
    Case("records-for-absent-plugins-with-a-winner", {"p": REVEAL},
         args=("-o", "ghost:x", "-E", "ghost:FOO=1", "-d", "nope")),

    # ---- which directory entries are plugins ----------------------------------
    Case("filtering-patterns",
         {name: log_and_fail(name) for name in (
             ".hidden", "#auto#", "#", "##", "a#", "#b", "c~", "~d", "e.dpkg-new",
              "f.dpkg-old", "g.dpkg-bak", "h.dpkg-divert", "i.dpkg-new.x", "dpkg-new",
              "j.dpkg-", ".dpkg-old", "k.DPKG-NEW", "l.dpkg-newer", "plain", "with space",
              "UPPER", "x.rpmnew", "m~n")},
         expect_status=0, expect_stdout=FALLBACK, observe=("started.log",)),
    Case("entry-types",
         {"exec": log_and_fail("exec"),
          "not-exec": log_and_fail("not-exec", 0o644),
          "exec-owner-only": log_and_fail("exec-owner-only", 0o744),
          "unreadable": log_and_fail("unreadable", 0o711),
          "nobody-owned": sh("echo nobody-owned >> @OUT@/started.log; exit 1", 0o700,
                             (NOBODY, 0)),
          "group-nogroup": sh("echo group-nogroup >> @OUT@/started.log; exit 1", 0o750,
                              (0, NOBODY)),
          "subdir": Dir(),
          "link-to-exec": Link("@TMP@/elsewhere/target"),
          "link-to-not-exec": Link("@TMP@/elsewhere/plain"),
          "link-dangling": Link("@TMP@/elsewhere/missing"),
          "link-to-dir": Link("@TMP@/elsewhere"),
          "link-relative": Link("exec")},
         files={"elsewhere/target": log_and_fail("target"),
                "elsewhere/plain": log_and_fail("plain", 0o644)},
         expect_status=0, expect_stdout=FALLBACK, observe=("started.log",)),
    Case("entry-types-special",
         {"exec": log_and_fail("exec"), "link-loop": Link("link-loop"),
          "link-dev-null": Link("/dev/null"), "link-to-link": Link("link-relative"),
          "link-relative": Link("../elsewhere/target")},
         files={"elsewhere/target": log_and_fail("target")},
         expect_status=0, expect_stdout=FALLBACK, observe=("started.log",)),
    Case("non-utf8-plugin-name", {os.fsdecode(b"p\xff"): REVEAL, "q": fail()},
         args=(b"-op\xff:\xfe", b"-Ep\xff:FOO=\xfd", b"-o", b"q:x")),
    Case("empty-file-plugin", {"a": File(""), "b": ok("b", 0.2)}, expect_stdout=b"b"),
    Case("no-interpreter-line", {"a": File("printf text\n"), "b": ok("b", 0.2)},
         expect_stdout=b"b"),
    Case("many-plugins", {**{f"f{i:02}": fail() for i in range(60)}, "win": ok("w", 0.3)},
         expect_stdout=b"w"),
    Case("only-non-executables", {"a": File("#!/bin/sh\necho a\n", 0o644), "d": Dir()},
         expect_status=0, expect_stdout=FALLBACK),
    Case("argv0-is-entry-name", {"shell": Copy(DASH), "alias": Link("@TMP@/bin/dash")},
         files={"bin/dash": Copy(DASH)},
         args=("-o", "shell:-c,exit 1", "-o", 'alias:-c,printf "<%s>" "$0"'),
         expect_stdout=b"<alias>"),
    Case("set-user-id-binary", {"id": Copy("/usr/bin/id", 0o4755)}, args=("-o", "id:-u,-r"),
         expect_stdout=b"65534\n"),
    Case("set-user-id-binary-euid", {"id": Copy("/usr/bin/id", 0o4755)}, args=("-o", "id:-u")),
    Case("set-user-id-binary-not-root", {"id": Copy("/usr/bin/id", 0o4755, (1000, 1000))},
         args=("-o", "id:-u")),
    Case("set-group-id-binary", {"id": Copy("/usr/bin/id", 0o2755)}, args=("-o", "id:-g")),
    Case("set-user-id-binary-nosuid-mount", {"id": Copy("/usr/bin/id", 0o4755)},
         args=("-o", "id:-u"), nosuid=True, expect_stdout=b"65534\n"),
    Case("descriptors-seen-by-plugin",
         {"a": fail(), "b": sh("sleep 0.2; exit 1"),
          "c": sh(r'for f in /proc/$$/fd/*; do readlink "$f"; done | sed "s/:\[.*//" | '
                  r'LC_ALL=C sort'),
          "d": sh("sleep 0.2; exit 1")}),
    Case("cwd-umask", {"p": sh("pwd; umask")}),
    Case("signal-dispositions-default",
         {"p": sh(r"grep -E '^Sig(Blk|Ign)' /proc/self/status")}),
    Case("signal-dispositions-inherited-ignore",
         {"p": sh(r"grep -E '^Sig(Blk|Ign)' /proc/self/status")},
         ignore_signals=(signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)),
    Case("signal-sigpipe-inherited-ignore",
         {"p": sh(r"grep -E '^Sig(Blk|Ign)' /proc/self/status")},
         ignore_signals=(signal.SIGPIPE,),
         expect_stdout=lambda out: b"SigIgn:\t0000000000000000" in out,
         deviation="SIGPIPE: the Python interpreter ignores SIGPIPE at start-up "
                   "whatever the caller had, so the runner cannot know the caller's "
                   "disposition; plugins get the default action (the original lets them "
                   "inherit an ignored SIGPIPE)"),

    # ---- privileges -------------------------------------------------------------
    Case("ids-default", {"p": IDS}, expect_stdout=b"65534/65534/65534"),
    Case("ids-explicit", {"p": IDS}, args=("--userid=1000", "--groupid", "1001"),
         expect_stdout=b"1000/1001/1001"),
    Case("ids-root", {"p": IDS}, args=("--userid", "0", "--groupid=0"), expect_stdout=b"0/0/0"),
    Case("ids-last-wins", {"p": IDS}, args=("--userid=1", "--userid=2", "--groupid=3",
                                            "--groupid=4"), expect_stdout=b"2/4/4"),
    Case("ids-leading-zeros", {"p": IDS}, args=("--userid=010", "--groupid=00"),
         expect_stdout=b"10/0/0"),
    Case("ids-bad-values-keep-previous", {"p": IDS},
         args=("--userid=7", "--userid=abc", "--userid=-1", "--userid=0x10", "--userid=5x",
               "--userid=", "--groupid=8", "--groupid=4294967296", "--groupid=1 "),
         expect_stdout=b"7/8/8"),
    Case("ids-largest-valid", {"p": IDS}, args=("--userid=4294967294", "--groupid=4294967294"),
         expect_stdout=b"4294967294/4294967294/4294967294"),
    Case("ids-sign-and-space", {"p": IDS}, args=("--userid=+5", "--groupid= 6"),
         expect_stdout=b"5/6/6"),
    Case("ids-minus-zero", {"p": IDS}, args=("--userid=-0", "--groupid=-0"),
         expect_stdout=b"0/0/0"),
    Case("ids-config-then-command-line", {"p": IDS}, config="--userid=1000 --groupid=1000\n",
         args=("--userid=2000",), expect_stdout=b"2000/1000/1000"),

    # ---- the winner rule ----------------------------------------------------------
    Case("winner-slow-success-after-failures",
         {"a": fail(1), "b": sh("printf killed; kill -KILL $$"), "c": fail(71, "c"),
          "d": ok("slow-winner", 0.4), "e": sh("exec /nonexistent/program")},
         expect_status=0, expect_stdout=b"slow-winner"),
    Case("all-fail", {"a": fail(1), "b": fail(2), "c": sh("kill -TERM $$")},
         expect_status=0, expect_stdout=FALLBACK),
    Case("exec-failure-bad-interpreter", {"a": File("#!/nonexistent/interpreter\n"),
                                           "b": ok("b", 0.2)}, expect_stdout=b"b"),
    Case("exec-failure-only", {"a": File("#!/nonexistent/interpreter\n")},
         expect_status=0, expect_stdout=FALLBACK),
    Case("winner-waits-for-stdout-holders",
         {"p": sh("(sleep 0.3; printf late) & printf early; exit 0")},
         expect_stdout=b"earlylate"),
    Case("winner-waits-for-exit", {"p": sh("printf done; exec >&-; sleep 0.3; exit 0"),
                                    "q": sh("sleep 0.1; exit 1")},
         expect_stdout=b"done"),
    Case("closed-stdout-then-fail", {"p": sh("printf x; exec >&-; sleep 0.2; exit 3"),
                                      "q": ok("q", 0.4)}, expect_stdout=b"q"),
    Case("empty-output-wins", {"p": sh("exit 0")}, expect_status=0, expect_stdout=b""),
    Case("newline-kept", {"p": sh(r"printf 'pass\n\n'")}, expect_stdout=b"pass\n\n"),
    Case("binary-output", {"p": sh("cat @TMP@/blob")}, files={"blob": File(BLOB, 0o644)},
         expect_stdout=BLOB),
    Case("large-output", {"p": sh("cat @TMP@/big")}, files={"big": File(BIG, 0o644)},
         expect_stdout=BIG),
    Case("output-in-slow-pieces", {"p": sh("printf a; sleep 0.1; printf b; sleep 0.1; printf c")},
         expect_stdout=b"abc"),
    Case("losers-get-sigterm",
         {"loser": sh("trap 'echo got-TERM >> @OUT@/loser.log; exit 1' TERM\n"
                      "echo ready >> @OUT@/loser.log\nsleep 10 & wait\necho not-killed"),
          "winner": sh("while [ ! -s @OUT@/loser.log ]; do sleep 0.05; done; printf w")},
         expect_stdout=b"w", observe=("loser.log",)),

    # ---- fallback input (stdin is not a terminal) ------------------------------------
    Case("fallback-no-newline", {}, stdin=b"abc", expect_stdout=b"abc"),
    Case("fallback-crlf", {}, stdin=b"abc\r\n", expect_stdout=b"abc\r"),
    Case("fallback-empty-line", {}, stdin=b"\n", expect_stdout=b""),
    Case("fallback-first-line-only", {}, stdin=b"one\ntwo\n", expect_stdout=b"one"),
    Case("fallback-binary", {}, stdin=b"\xff\xfe\x01\n", expect_stdout=b"\xff\xfe\x01"),
    Case("fallback-input-with-nul", {}, stdin=b"x\0y\n", expect_stdout=b"x"),
    Case("sigterm-during-fallback", {}, stdin=HOLD, signal_when=(0.5, signal.SIGTERM),
         expect_status=-signal.SIGTERM, expect_stdout=b""),
    Case("fifo-in-plugin-dir-is-skipped", {"fifo": Fifo()}, expect_status=0,
         expect_stdout=FALLBACK, timeout=3,
         deviation="a FIFO in the plugin directory is skipped at once (opened "
                   "non-blocking, then not a regular file); the original blocks in open() "
                   "until a writer appears, holding up the boot"),

    # ---- --help, --usage, --version: texts differ, compare status only --------------
    Case("help", {"p": REVEAL}, args=("--help",), compare="status", expect_status=0),
    Case("help-short", {"p": REVEAL}, args=("-?",), compare="status", expect_status=0),
    Case("help-prefix", {"p": REVEAL}, args=("--he",), compare="status", expect_status=0),
    Case("usage", {"p": REVEAL}, args=("--usage",), compare="status", expect_status=0),
    Case("version", {"p": REVEAL}, args=("--version",), compare="status", expect_status=0),
    Case("version-short", {"p": REVEAL}, args=("-V",), compare="status", expect_status=0),
    Case("version-prefix", {"p": REVEAL}, args=("--vers",), compare="status", expect_status=0),
    Case("version-in-config", {"p": REVEAL}, config="--version\n", compare="status",
         expect_status=0),
    Case("help-in-config", {"p": REVEAL}, config="--help\n", compare="status", expect_status=0),
    Case("version-after-usage-error", {"p": REVEAL}, args=("--version", "--bogus"),
         expect_status=64, expect_stdout=FALLBACK),
    Case("version-before-config-error", {"p": REVEAL}, config="--bogus\n", args=("--version",),
         expect_status=78, expect_stdout=FALLBACK),
    Case("version-then-positional", {"p": REVEAL}, args=("--version", "keyfile"),
         compare="status", expect_status=0),

    # ---- deliberate deviations: only ours is run, against the specification -----------
    Case("never-started-disabled-plugin-all-fail", {"a": fail(), "b": ok("b")},
         args=("-d", "b"), expect_status=0, expect_stdout=FALLBACK, deviation=HANG_QUIRK),
    Case("never-started-absent-plugin-all-fail", {"a": fail()},
         args=("-o", "ghost:x", "-E", "not-exec:FOO=1"),
         files={"plugins.d/not-exec": File("#!/bin/sh\n", 0o644)},
         expect_status=0, expect_stdout=FALLBACK, deviation=HANG_QUIRK),
    Case("output-flood-cap",
         {"flood": sh("head -c 9437184 /dev/zero"), "slow": ok("slow-ok", 0.5)},
         expect_status=0, expect_stdout=b"slow-ok",
         deviation="output flooding cap: we stop a plugin that writes more than 8 MiB "
                   "(the original buffers without limit)"),
    Case("sigkill-after-grace",
         {"stubborn": sh("trap '' TERM; echo ready > @OUT@/ready; sleep 30"),
          "winner": sh("while [ ! -e @OUT@/ready ]; do sleep 0.05; done; printf w")},
         expect_status=0, expect_stdout=b"w", timeout=20,
         deviation="SIGKILL after grace: we kill plugins that ignore SIGTERM after a grace "
                   "period (the original waits for them forever)"),
    Case("sigterm-to-runner", {"p": sh("echo started > @OUT@/started; exec sleep 30")},
         signal_when=("started", signal.SIGTERM), expect_status=-signal.SIGTERM,
         expect_stdout=b"", expect_no_leftover=True,
         deviation="signals to the runner: we stop the plugins and then die by the same "
                   "signal (the original dies at once and leaves its plugins running)"),
    Case("sighup-to-runner", {"p": sh("echo started > @OUT@/started; exec sleep 30")},
         signal_when=("started", signal.SIGHUP), expect_status=-signal.SIGHUP,
         expect_stdout=b"", expect_no_leftover=True,
         deviation="signals to the runner: we stop the plugins and then die by the same "
                   "signal (the original dies at once and leaves its plugins running)"),
    Case("supplementary-groups-cleared", {"p": sh("id -G")}, extra_groups=(4, 6, 27),
         expect_status=0, expect_stdout=b"65534\n",
         deviation="supplementary groups: we clear them when dropping root (the original "
                   "keeps root's groups for the plugins)"),
    Case("env-no-equals-dropped", {"env": Copy("/usr/bin/env")},
         args=("-G", "FOO", "-E", "env:BAR", "-G", "=x"), expect_status=0,
         expect_stdout=lambda out: all(b"=" in line and not line.startswith(b"=")
                                       for line in out.splitlines()),
         deviation="environment assignment without '=' (or without a name): we drop it "
                   "(the original passes a malformed environment entry on)"),
    Case("set-user-id-script", {"s": File("#!/usr/bin/python3\nimport os\n"
                                          "print(os.getresuid())\n", 0o4755)},
         expect_status=0, expect_stdout=b"(65534, 0, 0)\n",
         deviation="set-user-ID root scripts: we start them with effective UID 0 "
                   "(plugin_runner/privileges.py); the kernel, and so the original, "
                   "ignores the bit on scripts"),
    Case("ids-uid-minus-one-rejected", {"p": IDS}, args=("--userid=4294967295",),
         expect_status=0, expect_stdout=b"65534/65534/65534",
         deviation="--userid=4294967295 is (uid_t)-1: we reject it (the original accepts "
                   "it, setuid fails and the plugins run as root)"),
    Case("ids-overflow-is-a-warning", {"p": IDS}, args=("--userid=99999999999999999999",),
         expect_status=0, expect_stdout=b"65534/65534/65534",
         deviation="CLIENT.md §1.2: an out-of-range ID only warns; the original exits 71 "
                   "when the number overflows"),
]


# --------------------------------------------------------------------------
# Running

@dataclasses.dataclass
class Outcome:
    status: int | None  # None: timed out (then killed)
    stdout: bytes
    stderr: str
    observed: dict[str, list[bytes]]
    leftover: bool

    def key(self):
        return self.status, self.stdout, self.observed


class Tree:
    """The temporary folder of one case: plugins, configuration, output folder."""

    def __init__(self, root: Path, case: Case) -> None:
        self.root = root
        self.case = case
        self.plugins = root / "plugins.d"
        self.config = root / "plugin-runner.conf"
        self.out = root / "out"
        self.subs = {"@TMP@": str(root), "@PLUGINS@": str(self.plugins),
                     "@CONFIG@": str(self.config), "@OUT@": str(self.out)}
        self.mounted = False

    def build(self) -> None:
        case = self.case
        root = self.root
        if case.plugins is not None:
            self.plugins.mkdir(mode=0o755)
            if case.nosuid:
                self._mount_nosuid()
            for name, entry in case.plugins.items():
                self._make(self.plugins / name, entry)
        for name, entry in case.files.items():
            self._make(root / name, entry)
        if case.config is not None:
            self.config.write_bytes(self.expand(case.config, bytes))
            self.config.chmod(0o600)  # read before privileges are dropped

    def _mount_nosuid(self) -> None:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "nosuid,mode=0755",
                                 "mandos-test", str(self.plugins)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a nosuid tmpfs here: {result.stderr.strip()}")
        self.mounted = True

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.plugins)], check=True)
            self.mounted = False

    def expand(self, value: str | bytes, kind=None):
        for token, path in self.subs.items():
            if isinstance(value, bytes):
                value = value.replace(token.encode(), os.fsencode(path))
            else:
                value = value.replace(token, path)
        if kind is bytes and isinstance(value, str):
            return value.encode()
        return value

    def _make(self, path: Path, entry: Entry) -> None:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if isinstance(entry, Dir):
            path.mkdir(exist_ok=True)
            path.chmod(entry.mode)
        elif isinstance(entry, Link):
            path.symlink_to(self.expand(entry.target))
        elif isinstance(entry, Fifo):
            os.mkfifo(path)
            path.chmod(entry.mode)
        else:
            if isinstance(entry, Copy):
                shutil.copyfile(entry.source, path)
            else:
                path.write_bytes(self.expand(entry.content, bytes))
            if entry.owner is not None:
                os.chown(path, *entry.owner)
            path.chmod(entry.mode)  # after chown, which clears set-ID bits

    def argv(self, program: Path) -> list:
        args = [self.expand(arg) for arg in self.case.args]
        if self.case.defaults:
            args = ["--config-file=@CONFIG@", "--plugin-dir=@PLUGINS@"] + args
            args = [self.expand(arg) for arg in args]
        return [str(program)] + args

    def environ(self) -> dict:
        env: dict = dict(BASE_ENV)
        for name, value in self.case.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = self.expand(value)
        return env

    def run(self, program: Path) -> Outcome:
        case = self.case
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir()
        self.out.chmod(0o1777)
        stderr_path = self.root / "stderr"
        held = None
        if case.stdin is HOLD:
            stdin_fd, held = os.pipe()
        elif case.stdin is None:
            stdin_fd = os.open(os.devnull, os.O_RDONLY)
        else:
            stdin_path = self.root / "stdin"
            stdin_path.write_bytes(case.stdin)
            stdin_fd = os.open(stdin_path, os.O_RDONLY)

        def before_exec():
            for signum in case.ignore_signals:
                signal.signal(signum, signal.SIG_IGN)

        try:
            with open(stderr_path, "wb") as stderr:
                proc = subprocess.Popen(
                    self.argv(program), stdin=stdin_fd, stdout=subprocess.PIPE,
                    stderr=stderr, env=self.environ(), cwd=self.root,
                    start_new_session=True, extra_groups=list(case.extra_groups),
                    preexec_fn=before_exec if case.ignore_signals else None)
        except BaseException:
            if held is not None:
                os.close(held)
            raise
        finally:
            os.close(stdin_fd)
        deadline = time.monotonic() + case.timeout
        try:
            if case.signal_when is not None:
                when, signum = case.signal_when
                if isinstance(when, str):
                    while not (self.out / when).exists() and time.monotonic() < deadline:
                        time.sleep(0.01)
                else:
                    time.sleep(when)
                proc.send_signal(signum)
            try:
                stdout, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
                status = proc.returncode
            except subprocess.TimeoutExpired:
                _killpg(proc.pid)
                stdout, _ = proc.communicate()
                status = None
            leftover = False
            if case.expect_no_leftover:
                leftover = not _group_gone(proc.pid, 2.0)
        finally:
            if held is not None:
                os.close(held)
            _killpg(proc.pid)
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        observed = {}
        for name in case.observe:
            path = self.out / name
            observed[name] = sorted(path.read_bytes().splitlines()) if path.exists() else []
        return Outcome(status, stdout, stderr_path.read_text(errors="replace"), observed,
                       leftover)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        pass


def _group_gone(pgid: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except OSError as err:
            if err.errno != errno.EPERM:
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _describe(label: str, outcome: Outcome) -> str:
    stdout = outcome.stdout
    shown = repr(stdout) if len(stdout) <= 400 else f"{stdout[:400]!r}... ({len(stdout)} bytes)"
    return (f"--- {label}: status {outcome.status}\nstdout: {shown}\n"
            f"observed: {outcome.observed}\nstderr:\n{outcome.stderr[-2000:]}")


def _check_expectations(case: Case, outcome: Outcome, label: str) -> None:
    if case.expect_status is not None:
        assert outcome.status == case.expect_status, _describe(label, outcome)
    expected = case.expect_stdout
    if callable(expected):
        assert expected(outcome.stdout), _describe(label, outcome)
    elif expected is not None:
        assert outcome.stdout == expected, _describe(label, outcome)
    if case.compare == "status":
        assert outcome.stdout.strip(), _describe(label, outcome)
    if case.expect_no_leftover:
        assert not outcome.leftover, f"{label}: plugin processes outlived the runner"


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
        yield pytest.param(case, id=case.id, marks=marks)


assert len({case.id for case in CASES}) == len(CASES), "duplicate case ids"
assert all(case.compare in ("exact", "status") for case in CASES)
assert not any(case.bug and case.deviation for case in CASES)


@pytest.fixture(autouse=True)
def _need_root():
    if os.geteuid() != 0:
        pytest.skip("both runners must start as root to drop to uid 65534")


@pytest.mark.parametrize("case", _params())
def test_plugin_runner(case: Case, public_tmp: Path, request) -> None:
    tree = Tree(public_tmp, case)
    try:
        tree.build()
        _compare(case, tree, request)
    finally:
        tree.close()


def _compare(case: Case, tree: Tree, request) -> None:
    ours = tree.run(OUR_RUNNER)
    assert ours.status is not None, "ours timed out\n" + _describe("ours", ours)
    if case.deviation is not None:
        # Deliberate deviation (see case.deviation): the original is not run.
        _check_expectations(case, ours, "ours")
        return
    request.getfixturevalue("debian_peers")  # fetch and unpack the original once
    original = tree.run(_original())
    report = _describe("original", original) + "\n" + _describe("ours", ours)
    assert original.status is not None, "the original timed out\n" + report
    if case.compare == "status":
        assert ours.status == original.status, report
    else:
        assert ours.key() == original.key(), report
    _check_expectations(case, original, "original")
    _check_expectations(case, ours, "ours")


def _original() -> Path:
    import peers  # tests/ is on sys.path (conftest.py)
    return peers.original_plugin_runner()

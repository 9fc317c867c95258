"""Options of plugin-runner: the GNU-style parser and the settings it fills.

The same parser reads the real command line and the tokens of the
configuration file.  Options are applied strictly in the order given, so
that cumulative options (arguments, environment) keep their order and
single-valued ones (directories, IDs) are won by the last occurrence.
"""

import os
import sys

from mandos.cmdline import HelpRequested, UsageError, tokens, usage_line

DEFAULT_PLUGIN_DIR = "/lib/mandos/plugins.d"
DEFAULT_HELPER_DIR = "/lib/mandos/plugin-helpers"
DEFAULT_CONFIG_FILE = "/conf/conf.d/mandos/plugin-runner.conf"
DEFAULT_ID = 65534
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel

PROGRAM = "plugin-runner"


class PluginRecord:
    """Arguments, environment and the disabled flag for one plugin (or all)."""

    __slots__ = ("name", "args", "env", "disabled")

    def __init__(self, name: str) -> None:
        self.name = name
        self.args: list[str] = []
        self.env: dict[str, str] = {}
        self.disabled = False


class Settings:
    """Everything the command line and the configuration file decide."""

    __slots__ = ("plugin_dir", "helper_dir", "config_file", "uid", "gid",
                 "debug", "global_record", "plugins")

    def __init__(self) -> None:
        self.plugin_dir = DEFAULT_PLUGIN_DIR
        self.helper_dir = DEFAULT_HELPER_DIR
        self.config_file = DEFAULT_CONFIG_FILE
        self.uid = DEFAULT_ID
        self.gid = DEFAULT_ID
        self.debug = False
        self.global_record = PluginRecord("Global")
        self.plugins: dict[str, PluginRecord] = {}

    def record(self, name: str) -> PluginRecord:
        """Return the record of plugin ``name``, creating it on first mention."""
        rec = self.plugins.get(name)
        if rec is None:
            rec = self.plugins[name] = PluginRecord(name)
        return rec


# (long name, short letter, takes an argument, placeholder for --help)
OPTIONS = (
    ("global-options", "g", True, "OPTION[,OPTION[,...]]"),
    ("global-env", "G", True, "VAR=value"),
    ("options-for", "o", True, "PLUGIN:OPTION[,OPTION[,...]]"),
    ("env-for", "E", True, "PLUGIN:VAR=value"),
    ("disable", "d", True, "PLUGIN"),
    ("enable", "e", True, "PLUGIN"),
    ("plugin-dir", None, True, "DIRECTORY"),
    ("plugin-helper-dir", None, True, "DIRECTORY"),
    ("config-file", None, True, "FILE"),
    ("userid", None, True, "ID"),
    ("groupid", None, True, "ID"),
    ("debug", None, False, None),
    ("help", "?", False, None),
    ("usage", None, False, None),
    ("version", "V", False, None),
)

HELP_TEXT = """\
Usage: plugin-runner [OPTION...] [KEYFILE]
Run every password plugin in parallel and print the first password found.

  -g, --global-options=OPTION[,OPTION[,...]]
                             Arguments given to every plugin
  -G, --global-env=VAR=value Environment variable given to every plugin
  -o, --options-for=PLUGIN:OPTION[,OPTION[,...]]
                             Arguments given only to PLUGIN
  -E, --env-for=PLUGIN:VAR=value
                             Environment variable given only to PLUGIN
  -d, --disable=PLUGIN       Do not start PLUGIN
  -e, --enable=PLUGIN        Start PLUGIN after all (undo --disable)
      --plugin-dir=DIRECTORY Directory to run plugins from
                             (default: /lib/mandos/plugins.d)
      --plugin-helper-dir=DIRECTORY
                             Directory of plugin helpers, exported to plugins
                             as MANDOSPLUGINHELPERDIR
                             (default: /lib/mandos/plugin-helpers)
      --config-file=FILE     File with more options
                             (default: /conf/conf.d/mandos/plugin-runner.conf)
      --userid=ID            User ID the plugins run as (default: 65534)
      --groupid=ID           Group ID the plugins run as (default: 65534)
      --debug                Debug messages on standard error
  -?, --help                 Give this help list
      --usage                Give a short usage message
  -V, --version              Print program version

Mandatory arguments to long options are also mandatory for the
corresponding short options.  See plugin-runner(8mandos).
"""


def usage_text() -> str:
    """The short usage message of --usage."""
    return usage_line(PROGRAM, OPTIONS)


def parse(argv: list[str], settings: Settings, *, only_config_file: bool = False) -> None:
    """Parse ``argv`` (without the program name) into ``settings``.

    With ``only_config_file`` only ``--config-file`` is applied; every other
    option is still checked for syntax.  Raises UsageError or HelpRequested.
    """
    for name, value in tokens(argv, OPTIONS):
        if name is None:
            # cryptsetup passes the key-file field of crypttab as the first
            # argument; it is empty when that field is "none".
            if value != "" and not only_config_file:
                raise UsageError("Too many arguments")
            continue
        if only_config_file:
            if name == "config-file":
                settings.config_file = value
            continue
        _apply(settings, name, value)


def _split_plugin(value: str, option: str) -> tuple[str, str]:
    """Split ``PLUGIN:REST`` at the first colon."""
    plugin, colon, rest = value.partition(":")
    if not colon:
        raise UsageError(f'No colon in "{value}"')
    if not plugin:
        raise UsageError(f'Empty plugin name in "{value}" for --{option}')
    return plugin, rest


def _add_env(record: PluginRecord, assignment: str) -> None:
    var, eq, value = assignment.partition("=")
    if not eq or not var:
        # The original passes such a string through as a malformed
        # environment entry that programs ignore; we drop it openly.
        warn(f'Ignoring environment assignment without a name and "=": "{assignment}"')
        return
    record.env[var] = value


def _parse_id(value: str, what: str, previous: int) -> int:
    # strtoimax() rules: leading white space and a sign are allowed, nothing
    # may follow the digits.
    digits = value.lstrip(" \t\n\v\f\r")
    sign = -1 if digits.startswith("-") else 1
    digits = digits[1:] if digits[:1] in ("+", "-") else digits
    number = sign * int(digits) if digits.isascii() and digits.isdigit() else -1
    if not 0 <= number <= MAX_ID:
        warn(f'Bad {what} ID number: "{value}", using {previous}')
        return previous
    return number


def _apply(settings: Settings, name: str, value: str | None) -> None:
    if name == "global-options":
        settings.global_record.args.extend(value.split(","))
    elif name == "global-env":
        _add_env(settings.global_record, value)
    elif name == "options-for":
        plugin, rest = _split_plugin(value, name)
        settings.record(plugin).args.extend(rest.split(","))
    elif name == "env-for":
        plugin, rest = _split_plugin(value, name)
        _add_env(settings.record(plugin), rest)
    elif name == "disable":
        settings.record(value).disabled = True
    elif name == "enable":
        settings.record(value).disabled = False
    elif name == "plugin-dir":
        settings.plugin_dir = value
    elif name == "plugin-helper-dir":
        settings.helper_dir = value
    elif name == "config-file":
        pass  # honoured only on the real command line, in the first pass
    elif name == "userid":
        settings.uid = _parse_id(value, "user", settings.uid)
    elif name == "groupid":
        settings.gid = _parse_id(value, "group", settings.gid)
    elif name == "debug":
        settings.debug = True
    elif name == "help":
        raise HelpRequested(HELP_TEXT)
    elif name == "usage":
        raise HelpRequested(usage_text())
    elif name == "version":
        from plugin_runner import __version__
        raise HelpRequested(f"{PROGRAM} {__version__}\n")


def warn(message: str) -> None:
    """Print a message on standard error with the program name."""
    sys.stderr.write(f"{PROGRAM}: {message}\n")
    sys.stderr.flush()


def read_config_tokens(path: str) -> list[str] | None:
    """Return the whitespace-separated tokens of the configuration file.

    Everything from a ``#`` to the end of its line is a comment.  There is no
    quoting.  Returns None when the file cannot be opened (silently skipped);
    raises OSError for the errors that must not be ignored (out of file
    descriptors or memory).
    """
    import errno
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            raise
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        chunks = []  # e.g. a directory: as good as an empty file
    finally:
        os.close(fd)
    tokens: list[str] = []
    for line in b"".join(chunks).split(b"\n"):
        # bytes.split() splits on exactly space, TAB, CR, LF, FF and VT.
        tokens.extend(os.fsdecode(token) for token in line.partition(b"#")[0].split())
    return tokens

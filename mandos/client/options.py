"""mandos-client's command line.

Every option of the original is accepted with the same syntax and
defaults.  Bad values end the program at once with EX_USAGE, and so do
``--help``, ``--usage`` and ``--version`` (deliberately non-zero, so that
plugin-runner never takes their text for a password).
"""

import os

from mandos.cmdline import HelpRequested, UsageError, tokens, usage_line

PROGRAM = "mandos-client"
CONF_DIR = "/conf/conf.d/mandos"
DEFAULT_PRIORITY = ("SECURE128:!CTYPE-X.509:+CTYPE-RAWPK:!RSA:!VERS-ALL"
                    ":+VERS-TLS1.3:%PROFILE_ULTRA")
INT_MAX = 2**31 - 1

# (long name, short letter, takes an argument, placeholder, help)
OPTIONS = (
    ("connect", "c", True, "ADDRESS:PORT", "Connect directly to a specific Mandos server"),
    ("interface", "i", True, "INTERFACE[,INTERFACE[,...]]",
     "Network interfaces to bring up and use; 'none' for none"),
    ("pubkey", "p", True, "FILE", "OpenPGP public key file base name"),
    ("seckey", "s", True, "FILE", "OpenPGP secret key file base name"),
    ("tls-pubkey", "T", True, "FILE", "TLS public key file name"),
    ("tls-privkey", "t", True, "FILE", "TLS private key file name"),
    ("priority", None, True, "STRING", "GnuTLS priority string for the TLS handshake"),
    ("dh-bits", None, True, "BITS", "Bit length of the prime number used in the "
     "Diffie-Hellman key exchange"),
    ("dh-params", None, True, "FILE", "PEM-encoded PKCS#3 file with pre-generated "
     "parameters for the Diffie-Hellman key exchange"),
    ("delay", None, True, "SECONDS", "Maximum delay to wait for interface startup"),
    ("retry", None, True, "SECONDS", "Retry interval used when denied by the Mandos server"),
    ("network-hook-dir", None, True, "DIR", "Directory where network hooks are located"),
    ("debug", None, False, None, "Debug mode"),
    ("help", "?", False, None, "Give this help list"),
    ("usage", None, False, None, "Give a short usage message"),
    ("version", "V", False, None, "Print program version"),
)


class ClientOptions:
    """Settings from the command line, with the original's defaults."""

    __slots__ = ("connect", "interfaces", "pubkey", "seckey", "tls_pubkey",
                 "tls_privkey", "priority", "dh_bits", "dh_params", "delay",
                 "retry", "network_hook_dir", "debug")

    def __init__(self) -> None:
        self.connect: str | None = None
        self.interfaces: list[str] = []
        self.pubkey = f"{CONF_DIR}/pubkey.txt"
        self.seckey = f"{CONF_DIR}/seckey.txt"
        self.tls_pubkey = f"{CONF_DIR}/tls-pubkey.pem"
        self.tls_privkey = f"{CONF_DIR}/tls-privkey.pem"
        self.priority = DEFAULT_PRIORITY
        self.dh_bits = 0
        self.dh_params: str | None = None
        self.delay = 2.5
        self.retry = 10.0
        self.network_hook_dir = "/lib/mandos/network-hooks.d"
        self.debug = False


def help_text() -> str:
    """The --help text."""
    lines = [f"Usage: {PROGRAM} [OPTION...]",
             "Mandos client -- get and decrypt a password from a Mandos server", ""]
    for name, short, takes, arg, text in OPTIONS:
        left = (f"  -{short}, " if short else "      ") + f"--{name}" + (f"={arg}" if takes else "")
        if len(left) > 29:
            lines += [left, " " * 29 + text]
        else:
            lines.append(left.ljust(29) + text)
    lines += ["", "Mandatory arguments to long options are also mandatory for the",
              "corresponding short options.  See mandos-client(8mandos)."]
    return "\n".join(lines) + "\n"


def _number(value: str, option: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"Bad {option} value: {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise UsageError(f"Bad {option} value: {value!r}")
    return number


def parse(argv: list[str]) -> ClientOptions:
    """Parse the arguments (without the program name).

    Raises UsageError (exit 64 with a message) or HelpRequested.
    """
    options = ClientOptions()
    for name, value in tokens(argv, OPTIONS):
        if name is None:
            raise UsageError(f"Too many arguments: {value!r}")
        if name == "connect":
            options.connect = value
        elif name == "interface":
            options.interfaces.extend(value.split(","))
        elif name in ("pubkey", "seckey", "priority", "dh-params", "network-hook-dir"):
            setattr(options, name.replace("-", "_"), value)
        elif name == "tls-pubkey":
            options.tls_pubkey = value
        elif name == "tls-privkey":
            options.tls_privkey = value
        elif name == "dh-bits":
            if not (value.isascii() and value.isdigit()):
                raise UsageError(f"Bad dh-bits value: {value!r}")
            options.dh_bits = int(value)
        elif name == "delay":
            # The original also sets --retry here (a fall-through bug); the
            # two options are independent in this implementation.
            options.delay = _number(value, "delay")
        elif name == "retry":
            retry = _number(value, "retry")
            if retry < 0 or retry * 1000 > INT_MAX:
                raise UsageError(f"Bad retry value: {value!r}")
            options.retry = retry
        elif name == "debug":
            options.debug = True
        elif name == "help":
            raise HelpRequested(help_text())
        elif name == "usage":
            raise HelpRequested(usage_line(PROGRAM, OPTIONS))
        elif name == "version":
            from mandos import __version__
            raise HelpRequested(f"Mandos plugin {PROGRAM}: {PROGRAM} {__version__}\n")
    return options


def program_name() -> str:
    """The name used in messages: the plugin file's base name."""
    from mandos import process
    return process.program_name(PROGRAM)

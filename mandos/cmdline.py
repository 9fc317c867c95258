"""GNU-style command-line tokenizer shared by the boot-time programs.

The original programs parse options with GNU argp; the rules users rely on
are: ``--name=value`` and ``--name value``; ``-xvalue`` and ``-x value``;
clustered flags (``-dV``); unambiguous prefixes of long options; ``--`` ends
the options; options are processed strictly in the order given, with other
arguments allowed in between.

Standard library only and cheap to import: plugin-runner and the plugins
use it at every boot (argparse costs more start-up time than the whole
runner may).
"""

# An option is a tuple (long name, short letter or None, takes an argument);
# tables may carry more columns after those three.


class UsageError(Exception):
    """A bad option or a missing option argument."""


class HelpRequested(Exception):
    """--help, --usage or --version: the caller prints ``text`` on standard
    output and exits with its program's status for that."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def tokens(argv: list[str], options: tuple):
    """Yield ``(long name, value)`` for options and ``(None, arg)`` otherwise.

    ``argv`` excludes the program name.  The value is None for options that
    take no argument.  Raises UsageError with argp's wording.
    """
    takes = {option[0]: option[2] for option in options}
    shorts = {option[1]: option[0] for option in options if option[1]}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            for rest in argv[i:]:
                yield None, rest
            return
        if arg.startswith("--"):
            key, eq, inline = arg[2:].partition("=")
            name = match_long(key, arg, takes)
            if takes[name]:
                if eq:
                    value = inline
                elif i < len(argv):
                    value = argv[i]
                    i += 1
                else:
                    raise UsageError(f"option '--{name}' requires an argument")
                yield name, value
            elif eq:
                raise UsageError(f"option '--{name}' doesn't allow an argument")
            else:
                yield name, None
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                letter = arg[j]
                j += 1
                name = shorts.get(letter)
                if name is None:
                    raise UsageError(f"invalid option -- '{letter}'")
                if not takes[name]:
                    yield name, None
                    continue
                if j < len(arg):
                    value = arg[j:]
                elif i < len(argv):
                    value = argv[i]
                    i += 1
                else:
                    raise UsageError(f"option requires an argument -- '{letter}'")
                yield name, value
                break
        else:
            yield None, arg


def match_long(key: str, arg: str, names) -> str:
    """Resolve a long option name, accepting an unambiguous prefix."""
    if key in names:
        return key
    candidates = [name for name in names if name.startswith(key)] if key else []
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        listed = " ".join(f"'--{c}'" for c in candidates)
        raise UsageError(f"option '{arg}' is ambiguous; possibilities: {listed}")
    raise UsageError(f"unrecognized option '{arg}'")


def usage_line(program: str, options: tuple, width: int = 78) -> str:
    """The short ``--usage`` text in argp's layout, from an option table
    whose fourth column is the argument's placeholder."""
    columns = [option[:4] for option in options]  # tables may carry more columns
    flags = "".join(short for _, short, has_arg, _ in columns if short and not has_arg)
    parts = [f"[-{flags}]"] if flags else []
    parts += [f"[-{short} {arg}]" for _, short, has_arg, arg in columns if short and has_arg]
    parts += [f"[--{name}={arg}]" if has_arg else f"[--{name}]"
              for name, _, has_arg, arg in columns]
    lines, line = [], f"Usage: {program}"
    indent = " " * (len(line) - 1 if len(line) < 20 else 12)
    for part in parts:
        if len(line) + 1 + len(part) > width:
            lines.append(line)
            line = indent
        line += " " + part
    lines.append(line)
    return "\n".join(lines) + "\n"

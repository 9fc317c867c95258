"""Loggers that cost nothing until a message is actually emitted.

Importing :mod:`logging` takes about ten milliseconds (it pulls in ``re``,
``traceback`` and more), which is a tenth of the whole time mandos-client
needs to unlock a disk.  Modules on the client's boot path therefore log
through :func:`get_logger`: a call below the configured level returns at
once, and :mod:`logging` is imported and set up only when the first message
at or above it is emitted.  The messages end up in the standard logging
tree, so a program that configured :mod:`logging` itself sees them all.
"""

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

_threshold = DEBUG
_setup = None  # called once, before the first message is passed on


def configure(level: int, setup=None) -> None:
    """Emit messages at ``level`` or above; ``setup()`` configures logging first."""
    global _threshold, _setup
    _threshold = level
    _setup = setup


def _forward(name: str, level: int, message: str, args: tuple, exc_info) -> None:
    global _setup
    if _setup is not None:
        setup, _setup = _setup, None
        setup()
    import logging
    logging.getLogger(name).log(level, message, *args, exc_info=exc_info)


class LazyLogger:
    """The subset of :class:`logging.Logger` the boot path uses."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging's name
        return level >= _threshold

    def log(self, level: int, message: str, *args, exc_info=None) -> None:
        if level >= _threshold:
            _forward(self.name, level, message, args, exc_info)

    def debug(self, message: str, *args) -> None:
        if DEBUG >= _threshold:
            _forward(self.name, DEBUG, message, args, None)

    def info(self, message: str, *args) -> None:
        if INFO >= _threshold:
            _forward(self.name, INFO, message, args, None)

    def warning(self, message: str, *args) -> None:
        if WARNING >= _threshold:
            _forward(self.name, WARNING, message, args, None)

    def error(self, message: str, *args) -> None:
        if ERROR >= _threshold:
            _forward(self.name, ERROR, message, args, None)

    def exception(self, message: str, *args) -> None:
        if ERROR >= _threshold:
            _forward(self.name, ERROR, message, args, True)


def get_logger(name: str) -> LazyLogger:
    """A logger for ``name`` that imports :mod:`logging` only when needed."""
    return LazyLogger(name)

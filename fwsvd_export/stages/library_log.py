"""What the libraries a stage calls print, warn or log goes to the 'fwsvd_export' log, not the console.
optimum's exporter and ONNX Runtime's quantizers speak through console handlers of their own, Python
warnings, bare prints and the root logger, whose first use (a library's ``logging.warning(...)``)
installs a console handler on it for the rest of the process: every record of every logger, the
tool's own included, would then be printed a second time."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

LOG = logging.getLogger("fwsvd_export")


class _Forward(logging.Handler):
    """Re-logs a library's record on the 'fwsvd_export' logger: errors at their level, the rest one step
    quieter (a library warning at INFO, its info at DEBUG), so they show only when the user asks for them."""

    def __init__(self, speaker: str) -> None:
        super().__init__()
        self.speaker = speaker

    def emit(self, record: logging.LogRecord) -> None:
        level = (
            record.levelno
            if record.levelno >= logging.ERROR
            else (logging.INFO if record.levelno >= logging.WARNING else logging.DEBUG)
        )
        LOG.log(level, "%s (%s): %s", self.speaker, record.name, record.getMessage())


class _Divert(logging.Filter):
    """On the root logger: a record logged on it directly is forwarded and dropped. Records propagated
    up from other loggers never pass a parent's filters, so the root's own handlers still get those."""

    def __init__(self, forward: _Forward) -> None:
        super().__init__()
        self.forward = forward

    def filter(self, record: logging.LogRecord) -> bool:
        self.forward.handle(record)
        return False


@contextlib.contextmanager
def _logger_kept(logger: logging.Logger) -> Iterator[logging.Logger]:
    """The block may change `logger`'s handlers, filters, level and propagation (as a library configuring
    it on first use would): on exit, raising or not, it has exactly those it had on entry."""
    handlers, filters = logger.handlers[:], logger.filters[:]
    level, propagate, disabled = logger.level, logger.propagate, logger.disabled
    try:
        yield logger
    finally:
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
        for handler in handlers:
            logger.addHandler(handler)
        logger.filters[:] = filters
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled


@contextlib.contextmanager
def log_to_console() -> Iterator[None]:
    """Meanwhile, the 'fwsvd_export' log is printed on stderr ("LEVEL: message") unless it already has a
    handler (a program using the package configured it); on exit its handlers are those it had. The
    command line holds this for one command; the package itself never configures logging."""
    with _logger_kept(LOG):
        if not LOG.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
            LOG.addHandler(handler)
        yield


@contextlib.contextmanager
def library_output_to_log(speaker: str, loggers: tuple[str, ...]) -> Iterator[None]:
    """Meanwhile: Python warnings are recorded and logged at INFO (one line each), the named `loggers`'
    records and those logged on the root logger itself are forwarded (`_Forward`) instead of reaching
    console handlers, the root logger cannot be given a console handler, and text printed on sys.stdout
    / sys.stderr is logged at DEBUG (at WARNING when the call fails, as it may explain the failure). Each
    line names the `speaker` ("exporter", "int8 conversion"). An exception of the library propagates
    unchanged.

    Every setting touched is restored, the block raising or not: the named loggers and the root logger
    get back exactly the handlers, filters, level and propagation they had (a handler a library added
    meanwhile would hold the captured stream), the warnings filters and ``warnings.showwarning`` are
    restored by `warnings.catch_warnings`, and sys.stdout / sys.stderr by `contextlib.redirect_stdout`
    / `redirect_stderr`."""
    forward = _Forward(speaker)
    printed_out, printed_err = io.StringIO(), io.StringIO()
    caught: list[warnings.WarningMessage] = []
    failed = True
    try:
        with contextlib.ExitStack() as kept:
            for name in loggers:
                logger = kept.enter_context(_logger_kept(logging.getLogger(name)))
                for handler in logger.handlers[:]:
                    logger.removeHandler(handler)
                logger.addHandler(forward)
                logger.propagate = False
            root = kept.enter_context(_logger_kept(logging.getLogger()))
            if not root.handlers:
                root.addHandler(logging.NullHandler())  # logging.basicConfig adds nothing then
            root.addFilter(_Divert(forward))
            caught = kept.enter_context(warnings.catch_warnings(record=True))
            kept.enter_context(contextlib.redirect_stdout(printed_out))
            kept.enter_context(contextlib.redirect_stderr(printed_err))
            warnings.simplefilter("always")
            yield
        failed = False
    finally:
        for warning in caught:
            LOG.info(
                "%s warning: %s: %s (%s:%s)",
                speaker,
                warning.category.__name__,
                warning.message,
                Path(warning.filename).name,
                warning.lineno,
            )
        for stream, buffer in (("stdout", printed_out), ("stderr", printed_err)):
            if buffer.getvalue().strip():
                LOG.log(
                    logging.WARNING if failed else logging.DEBUG,
                    "%s %s: %s",
                    speaker,
                    stream,
                    buffer.getvalue().strip(),
                )

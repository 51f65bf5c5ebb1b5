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
from pathlib import Path
from typing import Iterator

LOG = logging.getLogger("fwsvd_export")


class _Forward(logging.Handler):
    """Re-logs a library's record on the 'fwsvd_export' logger: errors at their level, the rest one step
    quieter (a library warning at INFO, its info at DEBUG), so they show only when the user asks for them."""

    def __init__(self, speaker: str) -> None:
        super().__init__()
        self.speaker = speaker

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelno if record.levelno >= logging.ERROR else (
            logging.INFO if record.levelno >= logging.WARNING else logging.DEBUG)
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
def library_output_to_log(speaker: str, loggers: tuple[str, ...]) -> Iterator[None]:
    """Meanwhile: Python warnings are recorded and logged at INFO (one line each), the named `loggers`'
    records and those logged on the root logger itself are forwarded (`_Forward`) instead of reaching
    console handlers, the root logger cannot be given a console handler, and text printed on sys.stdout
    / sys.stderr is logged at DEBUG (at WARNING when the call fails, as it may explain the failure). Each
    line names the `speaker` ("exporter", "int8 conversion"). Every setting touched is restored, and an
    exception of the library propagates unchanged."""
    forward = _Forward(speaker)
    saved = []
    for name in loggers:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
        logger.addHandler(forward)
        logger.propagate = False
    root, divert = logging.getLogger(), _Divert(forward)
    placeholder = logging.NullHandler() if not root.handlers else None  # logging.basicConfig adds nothing then
    if placeholder is not None:
        root.addHandler(placeholder)
    root.addFilter(divert)
    printed_out, printed_err = io.StringIO(), io.StringIO()
    caught: list[warnings.WarningMessage] = []
    failed = True
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(printed_out), contextlib.redirect_stderr(printed_err):
            warnings.simplefilter("always")
            yield
        failed = False
    finally:
        root.removeFilter(divert)
        if placeholder is not None:
            root.removeHandler(placeholder)
        for logger, handlers, propagate in saved:
            logger.removeHandler(forward)
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate = propagate
        for warning in caught:
            LOG.info("%s warning: %s: %s (%s:%s)", speaker, warning.category.__name__, warning.message,
                     Path(warning.filename).name, warning.lineno)
        for stream, buffer in (("stdout", printed_out), ("stderr", printed_err)):
            if buffer.getvalue().strip():
                LOG.log(logging.WARNING if failed else logging.DEBUG, "%s %s: %s", speaker, stream,
                        buffer.getvalue().strip())

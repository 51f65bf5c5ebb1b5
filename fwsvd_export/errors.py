"""The one exception type users see: a clear message naming what was wrong and where."""

from __future__ import annotations

import reprlib
from collections.abc import Iterator
from contextlib import contextmanager


class FwsvdError(Exception):
    """A problem with the user's input (recipe, data, model or plan), not a bug in the tool."""


class SpecError(FwsvdError):
    """A bad field of a spec dataclass, `key` dotted relative to the spec ("" for the spec as a whole);
    whoever holds the spec adds its own place (`within`), the recipe loader the file and the full key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"'{key}' {problem}" if key else problem)
        self.key, self.problem = key, problem

    def within(self, place: str) -> SpecError:
        """The same error, one level up: the spec sits at `place` of a larger one."""
        return SpecError(
            f"{place}.{self.key}" if self.key and not self.key.startswith("[") else place + self.key, self.problem
        )


@contextmanager
def section(place: str) -> Iterator[None]:
    """Name a spec's errors from where the spec sits: a SpecError raised in the block gets `place` before
    its key (the core, which knows only its spec, says 'target'; a recipe's reader reads
    'compression.target'). Usable as a decorator."""
    try:
        yield
    except SpecError as exc:
        raise exc.within(place) from None


class _ShortRepr(reprlib.Repr):
    """repr() for error messages: bounded in size (a YAML alias bomb must not become a gigabyte message) and
    safe for integers too long for ``str`` (Python refuses to print more than 4300 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 80, 80, 80
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 4

    def repr_int(self, x: int, level: int) -> str:
        return f"<a {x.bit_length()}-bit integer>" if x.bit_length() > 256 else super().repr_int(x, level)


_SHORT = _ShortRepr()


def short_repr(value: object) -> str:
    """A short, never-failing repr of a user's value, for an error message."""
    try:
        return _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - a message must not fail while describing a bad value
        return f"<{type(value).__name__}>"


# transformers can explain a bad config with a list of every model type it knows (about 5 KB).
MESSAGE_LIMIT = 300


def short_message(exc: BaseException) -> str:
    """The first line of an error from a library, at most MESSAGE_LIMIT characters, for one-line reports."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 4].rstrip() + " ..."

"""The one exception type users see: a clear message naming what was wrong and where."""


class FwsvdError(Exception):
    """A problem with the user's input (recipe, data, model or plan), not a bug in the tool."""


class SpecError(FwsvdError):
    """A bad field of a spec dataclass; the recipe layer adds the file and the full dotted key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"'{key}' {problem}")
        self.key, self.problem = key, problem


# transformers can explain a bad config with a list of every model type it knows (about 5 KB).
MESSAGE_LIMIT = 300


def short_message(exc: BaseException) -> str:
    """The first line of an error from a library, at most MESSAGE_LIMIT characters, for one-line reports."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT - 4].rstrip() + " ..."

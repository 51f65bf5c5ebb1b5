"""The one exception type users see: a clear message naming what was wrong and where."""


class FwsvdError(Exception):
    """A problem with the user's input (recipe, data, model or plan), not a bug in the tool."""


class SpecError(FwsvdError):
    """A bad field of a spec dataclass; the recipe layer adds the file and the full dotted key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"'{key}' {problem}")
        self.key, self.problem = key, problem

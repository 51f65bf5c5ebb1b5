"""The one exception type users see: a clear message naming what was wrong and where."""


class FwsvdError(Exception):
    """A problem with the user's input (recipe, data, model or plan), not a bug in the tool."""

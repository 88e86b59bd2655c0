"""The one exception type the CLI turns into a message instead of a traceback."""


class DepthcutError(Exception):
    """A problem with the user's input or environment, explained in its message."""

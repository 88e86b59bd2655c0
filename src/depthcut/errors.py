"""The one exception type the CLI turns into a message instead of a traceback."""


class DepthcutError(Exception):
    """A problem with the user's input or environment, explained in its message."""


class OptionTypeError(DepthcutError, TypeError):
    """A config field or API parameter given a value of the wrong type; the message names it."""


class OptionValueError(DepthcutError, ValueError):
    """A config field or API parameter given a value outside its choices; the message names it."""

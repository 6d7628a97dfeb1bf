"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input or config; the message names the problem and the fix."""

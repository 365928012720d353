"""Errors that reach the user as one line and exit code 2."""


class UserError(Exception):
    """A problem with what the user asked for: bad config, missing path, unknown key.

    The CLI prints ``error: <message>`` on one line and exits with code 2, no traceback.
    """

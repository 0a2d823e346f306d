"""Errors a user gets as one line from the command line (exit status 2, no traceback unless ``--debug``)."""


class UsageError(ValueError):
    """A command line, recipe or setting that cannot run as written: an unknown key or option, a wrong
    type, a value out of range, a missing file the user named. The message says which and what to do."""


__all__ = ["UsageError"]

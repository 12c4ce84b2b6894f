"""The one exception type users see: a one-line message naming the file, record or key at fault."""


class FcitError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` on one line and exits with status 2."""

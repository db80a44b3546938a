"""The one exception type the CLI turns into a clean one-line error."""


class ZeroflowError(RuntimeError):
    """A user-facing error: bad option, missing data or weights, corrupt checkpoint."""


class WriteFailed(ZeroflowError):
    """``cannot write PATH: reason`` (disk full, permissions): the user's path, not a trace."""

"""The one exception type the CLI turns into a clean one-line error."""


class ZeroflowError(RuntimeError):
    """A user-facing error: bad option, missing data or weights, corrupt checkpoint."""


class WriteFailed(ZeroflowError):
    """``cannot write PATH: reason`` (disk full, permissions): the user's path, not a trace."""


def refuse_empty_path(path, option: str, fix: str, error: type = ZeroflowError) -> None:
    """Refuse an empty or blank path, what an unset shell variable (``--out "$DIR"``) gives,
    before anything is read or written: left alone it would fall back to a default place,
    or fail late with ``: no such file``. One wording for every path option of the CLI."""
    if path is not None and not str(path).strip():
        raise error(f"{option} is empty (an unset shell variable?); {fix}")

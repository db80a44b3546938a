"""The one exception type the CLI turns into a clean one-line error, and the few it says
more of."""
import errno
from typing import Optional


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


class OutputClosed(BrokenPipeError):
    """stdout closed by its reader (``zeroflow run ... | head -1``). Raised by a run: where it
    stopped (``run_dir`` ... ``rank``, as :class:`.runner.RunInterrupted` says it); by the
    CLI's own output (a table, a report): ``run_dir`` is None."""

    def __init__(self, run_dir: Optional[str] = None, completed: int = 0, n_tasks: Optional[int] = None,
                 resumable: bool = False, rank: int = 0):
        super().__init__(errno.EPIPE, "stdout was closed by its reader")
        self.run_dir, self.completed, self.n_tasks, self.resumable = run_dir, completed, n_tasks, resumable
        self.rank = rank

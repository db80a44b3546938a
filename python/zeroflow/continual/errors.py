"""The one exception type the CLI turns into a clean one-line error, and the few it says
more of."""
import errno
import os
from contextlib import contextmanager
from typing import Optional


class ZeroflowError(RuntimeError):
    """A user-facing error: bad option, missing data or weights, corrupt checkpoint.
    ``every_rank``: under torchrun, every rank raises it with the same text (a refused option,
    which every rank gets alike, or a refusal rank 0 broadcast); the CLI prints it on rank 0
    only. False (the default): only this rank may have hit it, so this rank says it."""

    every_rank = False


@contextmanager
def the_same_on_every_rank():
    """A ZeroflowError raised inside is one every rank of a torchrun job raises identically:
    the checks of the options alone (torchrun starts every rank with the same command line),
    not of files or devices, which another node may see differently."""
    try:
        yield
    except ZeroflowError as e:
        e.every_rank = True
        raise


def torchrun_rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


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

"""Writing and reading checkpoints when the storage fails: a full disk is one sentence (where,
how much is needed, what is intact), the half-written temporary directory is removed, and the
noise orbax and tensorstore print around such a failure is held back.

Why this is hand-written: orbax reports a full disk as a tensorstore `RESOURCE_EXHAUSTED`
ValueError after its worker threads have each logged the error with a traceback (absl `E` lines,
asyncio's "Task exception was never retrieved"), and a failed read leaves tensorstore callbacks
that land on a closed asyncio loop ("Event loop is closed", printed through
`sys.unraisablehook`). Neither library offers a switch for this. The filters below act only
around a save (held, then replayed unless the disk was full) and after a full disk we report
ourselves (the process is ending), and the unraisable hook drops only the closed-loop error.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import glob
import logging
import os
import shutil
import sys
import time

logger = logging.getLogger("easytune")

NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'", "os_error_code='122'")
NOISY_LOGGERS = ("absl", "asyncio")   # orbax logs through absl; asyncio logs its abandoned tasks


class StorageFull(OSError):
    """No space left where a checkpoint is written: a user's error, told in one sentence."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_no_space(error: BaseException) -> bool:
    """Whether `error` (an OSError, or the ValueError tensorstore raises) is a full disk or quota."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(error) for text in NO_SPACE_TEXT)


def _is_closed_loop(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


class _DropFailureNoise(logging.Filter):
    """Drops every warning and error of orbax (absl) and asyncio once a full disk has been
    reported: the process is ending with that sentence, and what its worker threads still log
    (the same failure, or "cannot schedule new futures after interpreter shutdown") adds nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


_DROP = _DropFailureNoise()


def quiet_after_failure() -> None:
    """From now on, drop the warnings orbax/tensorstore and asyncio emit late about a full disk
    this process has reported and is ending with (idempotent)."""
    for name in NOISY_LOGGERS:
        if _DROP not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_DROP)
    quiet_closed_loop_callbacks()


def quiet_closed_loop_callbacks() -> None:
    """Drop the unraisable 'Event loop is closed' errors of tensorstore callbacks that complete
    after orbax closed the asyncio loop of a failed read or write (they report nothing the
    failure did not; idempotent)."""
    previous = sys.unraisablehook
    if getattr(previous, "_easytune_quiet", False):
        return

    def hook(unraisable):
        if not _is_closed_loop(unraisable.exc_value):
            previous(unraisable)

    hook._easytune_quiet = True
    sys.unraisablehook = hook


class _DropOrphanedReadFailures(logging.Filter):
    """Drops asyncio's "Future/Task exception was never retrieved" records: after a failed read
    (a torn checkpoint, reported in one warning line) the read's other futures carry the same
    error and are logged whenever the garbage collector reaches them, as tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in str(record.msg)


_ORPHANED = _DropOrphanedReadFailures()


@contextlib.contextmanager
def quiet_read_failures(failures: list):
    """Around reading checkpoints that may be torn: drop the closed-loop callbacks and orphaned
    futures of a failed read. Both are installed before the first read, because tensorstore's
    callbacks fire while the failing read is still unwinding (CI caught one before the except
    clause ran). The block reports each failed read itself (one warning line) and appends it to
    `failures`; if that list is still empty at the end, the orphaned-future filter is removed
    again, else it stays (those futures are logged whenever the collector reaches them)."""
    quiet_closed_loop_callbacks()
    installed = _ORPHANED not in logging.getLogger("asyncio").filters
    if installed:
        logging.getLogger("asyncio").addFilter(_ORPHANED)
    try:
        yield
    finally:
        if installed and not failures:
            logging.getLogger("asyncio").removeFilter(_ORPHANED)


class _Hold(logging.Filter):
    """Holds every record back (to be replayed if the operation succeeds)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def held_library_logs():
    """Hold orbax's and asyncio's warnings while the block runs: replayed if it succeeds or fails
    for any reason but a full disk; dropped (and later ones about it too) on a full disk."""
    quiet_closed_loop_callbacks()
    hold = _Hold()
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(hold)
    failure = None
    try:
        yield
    except BaseException as error:
        failure = error
        raise
    finally:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).removeFilter(hold)
        if failure is not None and is_no_space(failure):
            quiet_after_failure()
        else:
            for record in hold.records:
                logging.getLogger(record.name).handle(record)


def settle(manager) -> None:
    """Let a failed save's remaining orbax threads finish (their own errors are the same failure)."""
    try:
        manager.wait_until_finished()
    except Exception:  # noqa: BLE001 (the failure being reported)
        pass


def remove_temporary(directory: str, step: int, settle_seconds: float = 1.0, timeout: float = 15.0) -> None:
    """Remove orbax's half-written `<step>.orbax-checkpoint-tmp*` under `directory` (local paths).

    Writer threads that outlive the failed save (on a busy machine the directory was seen to be
    left behind after a single removal pass) are waited out: the directory must stay gone for
    `settle_seconds` (at most `timeout`), and it is removed once more when the process exits, after
    the library's threads have been joined."""
    pattern = os.path.join(glob.escape(str(directory)), f"{step}.orbax-checkpoint-tmp*")

    def remove() -> bool:
        for path in glob.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
        return not glob.glob(pattern)

    deadline, gone_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if not remove():
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= settle_seconds:
            break
        time.sleep(0.05)
    atexit.register(remove)


def free_bytes(directory: str) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def no_space_message(what: str, directory: str, needed: int, keep: int, intact: int | None) -> str:
    """The sentence for a full disk while writing `what` into `directory`."""
    free = free_bytes(directory)
    free_text = f"{free / 1e6:.1f} MB are free" if free is not None else "the free space is unknown"
    keep_text = (f"; with --keep_checkpoints={keep} a run holds up to {keep + 1} at once while saving "
                 f"(about {(keep + 1) * needed / 1e6:.0f} MB)") if keep > 0 else ""
    intact_text = (f"the checkpoint of step {intact} is intact, so rerun with --resume after freeing space"
                   if intact is not None else "no earlier checkpoint exists")
    return (f"no space left on device writing {what} to {directory}: it takes about {needed / 1e6:.0f} MB and "
            f"{free_text}{keep_text}; the partial write was removed and {intact_text} (or choose another "
            f"--output_dir).")

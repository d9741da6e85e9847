"""A run owns its output_dir: an advisory lock held while it trains, and no silent start over another run's
checkpoints (they would interleave with this run's, and `resume_from_checkpoint: true` would pick either)."""

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time

from accelerate.utils import broadcast_object_list

from .checkpoints import list_checkpoints, remove_unpublished, wants_resume
from .errors import ConfigError

logger = logging.getLogger(__name__)

# "_" first: Trainer uploads output_dir to the Hub during training without files matching "_*", so the lock stays home.
LOCK_FILE = "_run.lock"
# Where overwrite_output_dir sets an earlier run's checkpoint-N aside until this run has saved its own.
SET_ASIDE = "_replaced-"  # "_" first: not uploaded with the model (see LOCK_FILE)

_held_fds: set[int] = set()


def _close_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock; closing its copy keeps the lock the parent's alone, so it
    # ends with the parent and not with the last worker.
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """`fcntl.flock` on `output_dir/_run.lock`, which records the holder's pid and host. The kernel drops a flock
    when its process dies, so a lock file left by a killed run blocks nothing. Re-entrant: the CLI may hold it around
    train() and the final save while train() takes it again."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.fd: int | None = None
        self.depth = 0

    def acquire(self) -> None:
        if self.depth:
            self.depth += 1
            return
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise ConfigError(
                    f"output_dir '{self.output_dir}' is in use by another run (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, started {holder.get('started', '?')}): two runs in one folder overwrite "
                    "each other's checkpoints. Wait for that run to end (or stop it), or give this run another "
                    "output_dir."
                ) from None
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                logger.warning(f"Cannot lock '{self.path}' ({err.strerror}: this filesystem has no file locks); a "
                               "second run into the same output_dir will not be detected.")
                return
            # The previous holder unlinks the file as it lets go: a lock on that old file guards nothing.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_holder(fd)
        if previous.get("pid"):
            logger.info(f"'{self.path}' was left by pid {previous['pid']} on {previous.get('host', '?')}, which has "
                        "ended; taking it over.")
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd, self.depth = fd, 1
        _held_fds.add(fd)

    def release(self) -> None:
        if self.depth > 1:
            self.depth -= 1
            return
        if self.fd is None:
            self.depth = 0
            return
        try:
            os.unlink(self.path)  # before unlocking: whoever opens the path next gets a new file
        except FileNotFoundError:
            pass
        _held_fds.discard(self.fd)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd, self.depth = None, 0

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # written halfway, or not ours
        return {}


def check_new_run(output_dir: str, overwrite: bool) -> None:
    """Called (holding the lock) for a run that does not resume: refuse a folder with another run's checkpoints, or,
    with `overwrite`, rename them to _replaced-checkpoint-N, where resume and rotation never pick them (nor mix them
    with this run's); they are deleted once this run has saved a complete checkpoint or finished
    (`delete_set_aside`), so a run started over by mistake can be stopped before anything is lost."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return
    names = [os.path.basename(c) for c in checkpoints]
    names = ", ".join(names) if len(names) <= 3 else f"{names[0]}, ..., {names[-1]}: {len(names)} checkpoints"
    if not overwrite:
        raise ConfigError(
            f"output_dir '{output_dir}' holds checkpoints of an earlier run ({names}); a new run there would mix its "
            "checkpoints with them. Continue that run with resume_from_checkpoint: true, start over in this folder "
            "with overwrite_output_dir: true (its checkpoints are deleted once this run has saved a checkpoint or "
            "finished), or give this run another output_dir."
        )
    for checkpoint in checkpoints:
        aside = os.path.join(output_dir, SET_ASIDE + os.path.basename(checkpoint))
        shutil.rmtree(aside, ignore_errors=True)  # set aside by an earlier overwrite whose run never saved
        os.rename(checkpoint, aside)
    logger.warning(f"overwrite_output_dir: renamed the earlier run's checkpoints in {output_dir} ({names}) to "
                   f"{SET_ASIDE}checkpoint-N; they are deleted once this run has saved a checkpoint or finished (move "
                   "them elsewhere now to keep them).")


def delete_set_aside(output_dir: str) -> None:
    for name in os.listdir(output_dir):
        if name.startswith(SET_ASIDE + "checkpoint-"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def claim_run_dir(lock: RunLock, run_dir: str, accelerator, is_main: bool, new_run: bool, resume,
                  overwrite: bool) -> None:
    """On world process zero: take `lock` (of `run_dir`); for a new run (`new_run`), delete what a killed save left,
    and refuse (or set aside) an earlier run's checkpoints unless it resumes. The other processes share the folder
    and stop with process zero's refusal. The caller releases the lock, refused or not."""
    refusal = None
    if is_main:
        try:
            lock.acquire()
            if new_run:
                remove_unpublished(run_dir)
            if new_run and not wants_resume(resume):
                check_new_run(run_dir, overwrite)
        except ConfigError as err:
            refusal = err
    if accelerator.num_processes > 1:
        message = broadcast_object_list([str(refusal) if refusal else None])[0]
        refusal = refusal or (ConfigError(message) if message else None)
    if refusal:
        raise refusal

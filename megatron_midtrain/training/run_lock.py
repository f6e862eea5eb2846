"""One live process per run directory: ``<run dir>/run.lock``.

Two launches on one ``run.dir`` (a SLURM requeue while the old job still runs, a sweep that
reuses a name) used to interleave their checkpoints and truncate each other's metrics.jsonl.
Global rank 0 now takes the lock in ``Trainer.__init__`` right after the run dir is chosen and
before anything is written there (config.yaml, data_index_cache/, metrics.jsonl and its
truncation, checkpoints, metrics.png, eval/, wandb/, profile/): every writer runs inside the
Trainer's lifetime, so every writer sits behind the lock. The result is broadcast, so a refused
launch fails on every rank with the same one-line :class:`UserError`. ``Trainer.close()``
releases it (also after an error), and only while it is still ours.

Design, for local disks and for the shared file systems of SLURM clusters (NFS, Lustre):

* **Creation is atomic and complete.** The holder's JSON (host, pid, start time, a random
  token, boot id, pid namespace, the pid's start tick) is written and fsynced into a private
  ``run.lock.<token>.tmp`` and hard-linked to ``run.lock``: ``link(2)`` fails if the name
  exists, atomically on local file systems, NFS (every version, unlike ``O_EXCL`` on NFSv2) and
  Lustre, and nobody ever sees a half-written lock. NFS can report a failure for a link that
  happened (a lost reply), so success is decided by comparing inodes afterwards. File systems
  without hard links fall back to ``os.open(O_CREAT | O_EXCL)``.
* **Liveness on the same machine** (same host name, boot id and pid namespace): the holder keeps
  an ``fcntl.flock`` on the lock file, which the kernel drops when the holder dies, SIGKILL
  included; a free flock *and* a pid that is gone (or was reused by another program: its start
  tick differs; or is a zombie) mean the holder is dead. A held flock with a dead pid means a
  child that inherited the descriptor (e.g. an async-checkpoint writer) still runs: still live.
* **Liveness across machines** uses a heartbeat only: a thread of the holder refreshes the lock
  file's mtime every ``min(30 s, run.lock_stale_s / 4)``; a lock whose mtime is older than
  ``run.lock_stale_s`` (default 600 s) is stale. The age is measured against a probe file
  created in the run dir, so both times come from the file server's clock (no clock skew
  between nodes). A thread, not the step loop, beats: a long data-index build, validation or
  checkpoint save never makes a live run look dead; a hung process keeps its lock (the safe
  failure: the error names it, and it can be killed). flock is not trusted across machines:
  NFSv3 keeps a crashed client's locks until it reboots, Lustre needs ``-o flock``.
* **Taking over** a dead holder's lock renames it to a private name and checks that the
  renamed file is the one judged dead (same inode and bytes: a freed inode number is reused at
  once); a lock created meanwhile by a faster launcher is put back, so two launchers never
  both win.
* **Ownership** is checked by inode (``stat(run.lock)`` against ``fstat`` of the holder's
  descriptor), never by re-opening the file: on NFS flock is emulated with POSIX locks, which a
  process loses when it closes *any* descriptor of the file. The token in the JSON names the
  holder; the inode proves it. A run that finds its lock gone or replaced stops on every rank
  (:class:`megatron_midtrain.callbacks.run_lock.RunLockGuard`) without writing more.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import sys
import threading
import time
from datetime import datetime, timezone

from megatron_midtrain.errors import UserError
from megatron_midtrain.training.distributed import broadcast_object

LOCK_NAME = "run.lock"
#: The heartbeat never waits longer than this between two refreshes.
MAX_HEARTBEAT_S = 30.0
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _pid_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (field 3), or None."""
    text = _read_text(f"/proc/{pid}/stat")
    return text[text.rfind(")") + 2:].split() if text else None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _identity() -> dict:
    """Who we are: what a lock file records to tell a same-machine holder from another."""
    stat = _pid_stat(os.getpid())
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_ns(), "pid_start_ticks": int(stat[19]) if stat else None}


def _pid_running(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    stat = _pid_stat(pid)
    if stat is None:
        return True  # no /proc: trust kill(0)
    if stat[0] == "Z":
        return False  # killed, not yet reaped
    return start_ticks is None or int(stat[19]) == start_ticks  # else: the pid was reused


def _flock_state(path: str) -> str:
    """'held', 'free' or 'unknown' (flock unsupported, no permission)."""
    try:
        fd = os.open(path, os.O_RDWR)  # LOCK_EX on NFS needs a writable descriptor
    except OSError:
        return "unknown"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    except OSError:
        return "unknown"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "free"
    finally:
        os.close(fd)


def _fs_now(run_dir: str) -> float:
    """The file server's "now": the mtime of a probe file created (and removed) in the run dir."""
    probe = os.path.join(run_dir, f".run.lock.now.{secrets.token_hex(6)}")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError:
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(probe)


def describe(info: dict | None) -> str:
    if not info:
        return "unknown holder: the lock file is unreadable"
    return f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('start_time')}"


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


class RunLock:
    """The lock on one run dir, held by this process (global rank 0). Use :meth:`acquire`."""

    def __init__(self, run_dir: str, stale_s: float, created_dirs: list[str]):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.stale_s = float(stale_s)
        self.token = secrets.token_hex(16)
        self.created_dirs = created_dirs
        self.info = dict(_identity(), pid=os.getpid(), token=self.token,
                         start_time=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                         start_unix=time.time(), argv=" ".join(sys.argv)[:500])
        self._fd: int | None = None
        self._text: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # ------------------------------------------------------------------ taking it
    @classmethod
    def acquire(cls, run_dir: str, stale_s: float) -> tuple[RunLock, str | None]:
        """Take the lock (creating ``run_dir`` if needed); ``(lock, takeover warning or None)``.
        A live holder is a :class:`UserError` naming it, and nothing is written."""
        created = []
        parent = os.path.abspath(run_dir)
        while not os.path.exists(parent):
            created.insert(0, parent)
            parent = os.path.dirname(parent)
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create run.dir {run_dir}: {err.strerror}", "choose a writable run.dir") from None
        lock, warning, unreadable = cls(run_dir, stale_s, created), None, 0
        for _ in range(20):
            if lock._create():
                lock._start_heartbeat()
                return lock, warning
            try:
                st = os.stat(lock.path)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            text = _read_text(lock.path)
            try:
                info = json.loads(text) if text else None
            except json.JSONDecodeError:
                info = None
            if not isinstance(info, dict):
                info, unreadable = None, unreadable + 1
                if unreadable <= 4:
                    time.sleep(0.5)  # the O_EXCL fallback writes the JSON just after creating the file
                    continue
            alive, reason = lock._judge(st, info)
            if alive:
                raise UserError(
                    f"run.dir {run_dir} is in use by another run ({describe(info)}; {reason})",
                    f"wait for that run to finish or choose another run.dir; if you are sure it is gone, delete {lock.path}",
                )
            if lock._claim(st, text):
                warning = (f"warning: run.dir {run_dir}: taking over {LOCK_NAME} from a run that is gone "
                           f"({describe(info)}; {reason})")
        raise UserError(f"could not take {lock.path}: it kept changing (several launches at once?)",
                        "launch one run per run.dir")

    def _create(self) -> bool:
        """Create run.lock holding our JSON, flocked; False if it exists."""
        data = (json.dumps(self.info, indent=1) + "\n").encode()
        self._text = data.decode().strip()
        tmp = f"{self.path}.{self.token}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        fallback, failed = False, None
        try:
            os.write(fd, data)
            os.fsync(fd)
            self._flock(fd)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
            except OSError as err:
                fallback, failed = err.errno in _NO_HARD_LINKS, err
        finally:
            os.unlink(tmp)
        if self._is(fd):  # also after an error: NFS may report a link that was made
            self._fd = fd
            return True
        os.close(fd)
        if failed is not None and not fallback:
            raise UserError(f"cannot create {self.path}: {failed.strerror}", "check the run.dir's file system") from None
        if not fallback:
            return False
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        os.write(fd, data)
        os.fsync(fd)
        self._flock(fd)
        self._fd = fd
        return True

    @staticmethod
    def _flock(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # unsupported here (Lustre without -o flock): pid and heartbeat remain
            pass

    def _is(self, fd: int) -> bool:
        try:
            return _same_inode(os.stat(self.path), os.fstat(fd))
        except OSError:
            return False

    def _judge(self, st: os.stat_result, info: dict | None) -> tuple[bool, str]:
        """(holder alive?, why)."""
        me = _identity()
        same_machine = bool(info) and info.get("host") == me["host"] and info.get("boot_id") == me["boot_id"]
        if same_machine:
            flock = _flock_state(self.path)
            pid = int(info.get("pid", -1))
            if info.get("pid_ns") == me["pid_ns"]:
                if _pid_running(pid, info.get("pid_start_ticks")):
                    return True, f"pid {pid} is running on this host"
                if flock == "held":
                    return True, (f"pid {pid} has exited but the lock is still held on this host, "
                                  "by a child process it left (e.g. an async checkpoint writer)")
                return False, f"pid {pid} is not running on this host"
            if flock == "held":
                return True, "its lock is held by a live process on this host"
        age = _fs_now(self.run_dir) - st.st_mtime
        if age > self.stale_s:
            return False, f"no heartbeat for {age:.0f}s > run.lock_stale_s={self.stale_s:g}"
        return True, f"last heartbeat {max(age, 0):.0f}s ago; it is stale after run.lock_stale_s={self.stale_s:g}"

    def _claim(self, judged: os.stat_result, text: str | None) -> bool:
        """Remove run.lock if it is still the file ``judged`` with content ``text`` (else leave it
        in place). The content too, because a freed inode number is reused at once (ext4)."""
        private = f"{self.path}.stale.{self.token}"
        try:
            os.rename(self.path, private)
        except FileNotFoundError:
            return False
        try:
            if _same_inode(os.stat(private), judged) and _read_text(private) == text:
                return True
            try:  # someone else's fresh lock: put it back (same inode, its flock included)
                os.link(private, self.path)
            except FileExistsError:
                pass
            return False
        finally:
            os.unlink(private)

    # ------------------------------------------------------------------ holding it
    def owned(self) -> bool:
        """Whether run.lock is still our file (not removed, not taken over)."""
        if self._fd is None or self.lost:
            return False
        if not self._is(self._fd):
            self.lost = True
        return not self.lost

    def ensure_held(self) -> None:
        if not self.owned():
            holder = _read_text(self.path)
            try:
                now = describe(json.loads(holder)) if holder else "nobody"
            except json.JSONDecodeError:
                now = "an unreadable lock file"
            raise UserError(
                f"this run no longer holds {self.path} (removed or taken over; it now names {now}); "
                "stopping without writing more to the run dir",
                "run one process per run.dir; raise run.lock_stale_s if a live run on another host looked stale",
            )

    @property
    def heartbeat_s(self) -> float:
        return max(0.05, min(MAX_HEARTBEAT_S, self.stale_s / 4))

    def heartbeat(self) -> None:
        """Refresh the lock's mtime (the cross-host liveness signal) if it is still ours."""
        if self.owned():
            try:
                os.utime(self._fd) if os.utime in os.supports_fd else os.utime(self.path)
            except OSError:  # a transient file-server error: the next beat retries
                pass

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s) and self.owned():
                self.heartbeat()

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self, remove_created_dirs: bool = False) -> None:
        """Remove run.lock if it is still ours; with ``remove_created_dirs`` (a failed start)
        also the directories :meth:`acquire` created, when they are empty. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is None:
            return
        try:
            if self.owned():
                self._claim(os.fstat(self._fd), self._text)
        finally:
            os.close(self._fd)
            self._fd = None
        if remove_created_dirs:
            for path in reversed(self.created_dirs):
                try:
                    os.rmdir(path)
                except OSError:
                    break


def acquire_run_lock(run_dir: str, stale_s: float, rank0: bool) -> RunLock | None:
    """Collective: rank 0 takes the lock (see :class:`RunLock`); a refusal is raised on every rank.
    Returns the lock on rank 0, None elsewhere."""
    if not stale_s > 0:
        raise UserError(f"run.lock_stale_s={stale_s} must be positive", "use e.g. run.lock_stale_s=600")
    lock, failure = None, None
    if rank0:
        try:
            lock, warning = RunLock.acquire(run_dir, stale_s)
            if warning:
                print(warning, file=sys.stderr, flush=True)
        except UserError as err:
            failure = str(err)
        except Exception as err:
            broadcast_object(f"rank 0 could not take {os.path.join(run_dir, LOCK_NAME)}: {err!r}")
            raise
    failure = broadcast_object(failure)
    if failure is not None:
        raise UserError(failure)
    return lock

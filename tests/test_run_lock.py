"""One live process per run dir (issue 14): ``<run dir>/run.lock`` (training/run_lock.py).

Real launches of ``midtrain``: a second launch on a live run is refused with one ``error:``
line and writes nothing; a dead holder's lock (a reaped pid, a SIGKILLed run) is taken over
with a warning; a DP2 run's lock is held by its rank 0 and a second DP2 launch fails on every
rank. The live holder is paused with SIGSTOP while the second launch runs: it is alive (its pid
runs, its flock is held) and its files cannot change, so their bytes compare exactly. The
unit tests at the end cover what one machine cannot stage for real (another host's heartbeat,
pid reuse, racing takeovers).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from megatron_midtrain.errors import UserError
from megatron_midtrain.testing.distributed import free_port, run_distributed
from megatron_midtrain.training.metrics import read_metrics
from megatron_midtrain.training.run_lock import LOCK_NAME, RunLock, _identity

#: Tiny steps (4 x 64 tokens, one micro-batch): a launch costs its start-up, not its steps.
FAST = ["train.global_batch_tokens=256", "data.seq_length=64", "train.micro_batch_size=4", "train.eval_interval=0",
        "train.log_interval=100", "run.plot=false", "method=ntp"]


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "megatron_midtrain.train", *FAST, f"run.dir={run_dir}", *extra]


def _start(cmd, **kw):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _wait_for(proc, condition, timeout=300.0, poll=0.005):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended first (rc {proc.returncode}): {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(poll)


def _steps(run_dir) -> list[int]:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
            return [json.loads(line)["step"] for line in fh if line.endswith("\n")]
    except (OSError, ValueError):
        return []


def _snapshot(run_dir) -> dict[str, bytes]:
    """Every file under the run dir, by relative path, with its bytes (and the directories)."""
    out = {}
    for folder, dirs, files in os.walk(run_dir):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), run_dir) + "/"] = b""
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, run_dir)] = fh.read()
    return out


def _lock(run_dir) -> dict:
    with open(os.path.join(run_dir, LOCK_NAME)) as fh:
        return json.load(fh)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:") and LOCK_NAME in line]


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: the pid is free (and not reused this quickly)
    return child.pid


# --------------------------------------------------------------------------- real launches
def test_second_launch_on_a_live_run_is_refused_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    first = _start(_cmd(run, "train.max_steps=20", "train.save_interval=5"))
    try:
        _wait_for(first, lambda: len(_steps(run)) >= 2)  # training, a few steps logged
        os.kill(first.pid, signal.SIGSTOP)  # alive, paused: nothing in the run dir changes now
        try:
            holder = _lock(run)
            assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
            before = _snapshot(run)
            assert before["metrics.jsonl"]
            second = subprocess.run(_cmd(run, "train.max_steps=20", "train.save_interval=5"), capture_output=True,
                                    text=True, timeout=300)
            after = _snapshot(run)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        print("second launch stdout:", second.stdout, "second launch stderr:", second.stderr, sep="\n")
        assert second.returncode == 2, second.stderr[-3000:]
        (error,) = _error_lines(second.stderr)
        assert f"pid {first.pid}" in error and f"host {holder['host']}" in error and holder["start_time"] in error
        assert "fix:" in error and "choose another run.dir" in error and str(run / LOCK_NAME) in error
        assert "Traceback" not in second.stderr
        assert after == before  # the live run's files, byte for byte: nothing written, nothing cut
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert [r["step"] for r in read_metrics(str(run))] == list(range(1, 21))
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    stale = dict(_identity(), pid=dead, token="f" * 32, start_time="2020-01-01T00:00:00Z")
    (run / LOCK_NAME).write_text(json.dumps(stale))
    proc = subprocess.run(_cmd(run, "train.max_steps=3"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (warning,) = _warning_lines(proc.stderr)
    assert "taking over" in warning and f"pid {dead} is not running" in warning and "2020-01-01T00:00:00Z" in warning
    assert not _error_lines(proc.stderr)
    assert [r["step"] for r in read_metrics(str(run))] == [1, 2, 3]
    assert not (run / LOCK_NAME).exists()


def test_sigkill_then_relaunch_takes_over_and_resumes(tmp_path):
    run = tmp_path / "run"
    cmd = _cmd(run, "train.max_steps=20", "train.save_interval=4")
    first = _start(cmd)
    try:
        _wait_for(first, lambda: len(_steps(run)) >= 6)  # past the step-4 checkpoint
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    killed_at = _steps(run)[-1]
    assert killed_at < 20, "the run finished before it could be killed"
    assert _lock(run)["pid"] == first.pid  # SIGKILL left the lock behind
    with open(run / "checkpoints" / "latest") as fh:
        last_ckpt = int(fh.read())
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    (warning,) = _warning_lines(again.stderr)
    assert f"pid {first.pid} is not running" in warning
    assert f"(step {last_ckpt})" in again.stdout and "resumed from" in again.stdout
    assert [r["step"] for r in read_metrics(str(run))] == list(range(1, 21))  # none twice, none missing
    assert not (run / LOCK_NAME).exists()


def _second_launch(overrides: list[str]) -> str | None:
    """Build a Trainer (every rank): the refusal each rank gets, or None if it started."""
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.training.trainer import Trainer

    try:
        Trainer(load_config(overrides)).close()
    except UserError as err:
        return str(err)
    return None


def test_dp2_run_holds_the_lock_on_rank0_and_a_second_dp2_launch_fails_on_every_rank(tmp_path):
    run = tmp_path / "run"
    overrides = FAST + [f"run.dir={run}", "train.max_steps=20", "train.save_interval=10", "train.micro_batch_size=2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                "-m", "megatron_midtrain.train", *overrides]
    first = _start(torchrun)
    holder = None
    try:
        _wait_for(first, lambda: len(_steps(run)) >= 2)
        holder = _lock(run)
        assert holder["pid"] != first.pid  # rank 0's process, not torchrun's
        with open(f"/proc/{holder['pid']}/environ", "rb") as fh:
            env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
        assert env[b"RANK"] == b"0" and env[b"WORLD_SIZE"] == b"2"
        os.kill(holder["pid"], signal.SIGSTOP)  # rank 1 waits for it in the next collective
        try:
            before = _snapshot(run)
            errors = run_distributed(_second_launch, 2, overrides, timeout_s=300)
            after = _snapshot(run)
        finally:
            os.kill(holder["pid"], signal.SIGCONT)
        print("second launch, per rank:", errors)
        assert errors[0] is not None and errors == [errors[0]] * 2  # the same refusal on both ranks
        assert f"pid {holder['pid']}" in errors[0] and "fix:" in errors[0]
        assert after == before
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            if holder:
                os.kill(holder["pid"], signal.SIGCONT)
            first.terminate()  # torchrun forwards it to the ranks (they run in sessions of their own)
            first.wait(timeout=60)
    assert [r["step"] for r in read_metrics(str(run))] == list(range(1, 21))
    assert not (run / LOCK_NAME).exists()


def _train_and_lose_the_lock(overrides: list[str]) -> dict:
    """Train; after step 2 the lock file is replaced by another run's (a takeover). What happens."""
    from megatron_midtrain.callbacks.base import Callback
    from megatron_midtrain.testing.runs import train_and_report

    class StealLock(Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == 2 and trainer.rank0:
                os.unlink(os.path.join(trainer.run_dir, LOCK_NAME))
                _write_lock(trainer.run_dir, host="newholder.invalid")

    out = train_and_report(overrides, callbacks=[StealLock()], catch_user_error=True)
    return {"error": out["error"], "steps": _steps(out["run_dir"]), "lock": _lock(out["run_dir"])}


def test_a_run_that_loses_its_lock_stops_without_writing_more(tmp_path):
    out = run_distributed(_train_and_lose_the_lock, 1, FAST + [f"run.dir={tmp_path}", "train.max_steps=6"])[0]
    assert out["error"] and "no longer holds" in out["error"] and "newholder.invalid" in out["error"], out
    assert out["steps"] == [1, 2]  # step 3 was stopped before the writers saw it
    assert out["lock"]["host"] == "newholder.invalid"  # close() left the new holder's lock alone
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------- the lock itself
def _write_lock(run_dir, age_s: float = 0.0, **info) -> str:
    path = os.path.join(run_dir, LOCK_NAME)
    with open(path, "w") as fh:
        json.dump(dict(dict(host="otherhost.invalid", pid=4242, token="a" * 32, start_time="2020-01-01T00:00:00Z"),
                       **info), fh)
    if age_s:
        now = time.time()
        os.utime(path, (now - age_s, now - age_s))
    return path


def test_other_host_lock_is_live_until_its_heartbeat_is_older_than_lock_stale_s(tmp_path):
    path = _write_lock(tmp_path, age_s=100)
    with pytest.raises(UserError, match=r"host otherhost.invalid, pid 4242.*last heartbeat 1\d\ds ago.*run.lock_stale_s=600"):
        RunLock.acquire(str(tmp_path), 600)
    assert json.load(open(path))["pid"] == 4242  # untouched
    lock, warning = RunLock.acquire(str(tmp_path), 60)  # the same lock, stale under 60 s
    try:
        assert "taking over" in warning and "no heartbeat for 1" in warning and "run.lock_stale_s=60" in warning
        assert json.load(open(path))["token"] == lock.token
    finally:
        lock.release()
    assert not os.path.exists(path)


def test_same_host_pid_reuse_and_zombies_count_as_dead(tmp_path):
    me = _identity()
    # our own pid, but another start tick: the pid was reused by another program
    _write_lock(tmp_path, **dict(me, pid=os.getpid(), pid_start_ticks=me["pid_start_ticks"] - 1))
    lock, warning = RunLock.acquire(str(tmp_path), 600)
    lock.release()
    assert f"pid {os.getpid()} is not running" in warning
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 30
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _write_lock(tmp_path, **dict(me, pid=zombie.pid, pid_start_ticks=None))
    lock, warning = RunLock.acquire(str(tmp_path), 600)
    lock.release()
    zombie.wait()
    assert f"pid {zombie.pid} is not running" in warning
    # a live pid of this host (ourselves, same start tick) is live
    _write_lock(tmp_path, **dict(me, pid=os.getpid()))
    with pytest.raises(UserError, match=f"pid {os.getpid()} is running on this host"):
        RunLock.acquire(str(tmp_path), 600)


def test_held_lock_heartbeat_ownership_and_release(tmp_path):
    lock, warning = RunLock.acquire(str(tmp_path / "a" / "b"), 0.4)  # heartbeat every 0.1 s
    assert warning is None
    path = lock.path
    os.utime(path, (0, 0))
    time.sleep(0.5)
    assert time.time() - os.stat(path).st_mtime < 1.0  # the heartbeat refreshed it
    with pytest.raises(UserError, match="pid .* is running on this host"):  # same process, still held
        RunLock.acquire(str(tmp_path / "a" / "b"), 0.4)
    assert lock.owned()
    lock.ensure_held()
    # taken over (a launch that judged us dead): we notice, and release leaves the new lock alone
    os.unlink(path)
    _write_lock(tmp_path / "a" / "b", host="newholder.invalid")
    assert not lock.owned()
    with pytest.raises(UserError, match="no longer holds .*newholder.invalid"):
        lock.ensure_held()
    lock.release()
    assert json.load(open(path))["host"] == "newholder.invalid"


def test_failed_start_removes_the_lock_and_the_directories_it_created(tmp_path):
    lock, _ = RunLock.acquire(str(tmp_path / "new" / "run"), 600)
    lock.release(remove_created_dirs=True)
    assert os.listdir(tmp_path) == []


def test_racing_takeover_puts_a_fresh_lock_back(tmp_path):
    """B judged the old lock dead, but A replaced it first: B's claim must not remove A's lock."""
    path = _write_lock(tmp_path, age_s=10_000)
    judged, text = os.stat(path), open(path).read().strip()
    a, _ = RunLock.acquire(str(tmp_path), 600)  # A takes over (its file may even reuse the inode number)
    b = RunLock(str(tmp_path), 600, [])
    assert not b._claim(judged, text)  # B's rename grabbed A's lock: put back
    assert a.owned() and json.load(open(path))["token"] == a.token
    a.release()


def test_metrics_writer_needs_the_lock(tmp_path):
    from megatron_midtrain.training.metrics import MetricsWriter

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(ValueError, match="lock"):
        MetricsWriter(str(tmp_path), 1, lock=None)
    other = RunLock(str(tmp_path), 600, [])  # never acquired
    with pytest.raises(UserError, match="no longer holds"):
        MetricsWriter(str(tmp_path), 1, lock=other)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'  # not cut

"""One run per run dir: a second `mapgap` on a run dir in use exits 2 with one
line naming the owner (local: flock; S3: a conditional-put lock object with a
heartbeat), a dead owner's lock is taken over, `--force-unlock` takes any."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mapgap import storage
from mapgap.lock import LOCK_NAME, Owner, RunLock, RunLockedError
from tests.helpers_inference import make_config
from tests.test_signals import start_mapgap, stuck_scene, wait_until_stuck


def mapgap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapgap.cli", *args], capture_output=True,
                          text=True, timeout=300)


def assert_refused(proc: subprocess.CompletedProcess, run_uri: str, pid: int) -> None:
    """Exit 2, one line naming the run dir and the owner (pid, host, since)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {run_uri} is in use by pid {pid} on host"
                               f" {socket.gethostname()} since 20")
    assert "--force-unlock" in lines[0]


@pytest.mark.slow
def test_second_mapgap_on_a_local_run_dir_in_use_exits_2(tmp_path: Path) -> None:
    cfg, config, _ = stuck_scene(tmp_path)
    log = tmp_path / "first.log"
    first = start_mapgap("predict", str(config), log=log)
    try:
        tree = wait_until_stuck(first, log)
        assert_refused(mapgap("predict", str(config)), cfg.run_uri, first.pid)
        assert_refused(mapgap("run", str(config)), cfg.run_uri, first.pid)
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=60)
        psutil.wait_procs(tree, timeout=10)


def s3_config(tmp_path: Path, bucket: str) -> tuple[object, Path]:
    cfg = make_config(tmp_path, storage={"root": f"{bucket}/out"})
    config = tmp_path / "s3.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json", exclude_defaults=True)))
    return cfg, config


def test_second_mapgap_on_an_s3_run_dir_in_use_exits_2(tmp_path: Path, s3_bucket: str) -> None:
    cfg, config = s3_config(tmp_path, s3_bucket)
    with RunLock(cfg.run_uri):
        assert_refused(mapgap("predict", str(config)), cfg.run_uri, os.getpid())
    assert not storage.exists(storage.join(cfg.run_uri, LOCK_NAME))  # released: no object


def put_owner(run_uri: str, owner: Owner) -> None:
    storage.write_bytes(storage.join(run_uri, LOCK_NAME), owner.dump())


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_s3_lock_of_a_dead_owner_is_taken_over(s3_bucket: str) -> None:
    run_uri = f"{s3_bucket}/runs/a"
    now = time.time()
    # Same host, its pid gone (a kill -9): taken over at once.
    gone = Owner(socket.gethostname(), dead_pid(), now - 5, now, "a" * 32)
    put_owner(run_uri, gone)
    with RunLock(run_uri) as lock:
        assert lock.previous == gone
    # Another host, heartbeat older than MAPGAP_LOCK_STALE_S: taken over.
    silent = Owner("elsewhere", 1, now - 900, now - 600, "b" * 32)
    put_owner(run_uri, silent)
    with RunLock(run_uri) as lock:
        assert lock.previous == silent
    # Another host, fresh heartbeat: refused, unless forced.
    live = Owner("elsewhere", 1, now - 60, now, "c" * 32)
    put_owner(run_uri, live)
    with pytest.raises(RunLockedError, match="in use by pid 1 on host elsewhere since"):
        RunLock(run_uri).acquire()
    with RunLock(run_uri, force=True) as lock:
        assert lock.previous == live
        with pytest.raises(RunLockedError):  # now ours, and we are alive
            RunLock(run_uri).acquire()


def test_s3_heartbeat_keeps_a_long_run_alive(s3_bucket: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAPGAP_LOCK_STALE_S", "0.8")
    run_uri = f"{s3_bucket}/runs/b"
    uri = storage.join(run_uri, LOCK_NAME)
    with RunLock(run_uri):
        first = Owner.parse(storage.read_bytes(uri))
        time.sleep(2.0)  # longer than the stale age: only the heartbeat keeps it
        later = Owner.parse(storage.read_bytes(uri))
        assert later.heartbeat > first.heartbeat + 0.5
        with pytest.raises(RunLockedError):
            RunLock(run_uri).acquire()


def test_local_lock_is_exclusive_and_dies_with_its_owner(tmp_path: Path) -> None:
    run_uri = str(tmp_path / "runs" / "x")
    with RunLock(run_uri) as lock:
        with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()} on host"):
            RunLock(run_uri).acquire()
        with RunLock(run_uri, force=True) as forced:  # --force-unlock
            assert forced.previous == lock.owner
    # An owner killed with -9: the kernel dropped its flock; its record remains.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from mapgap.lock import RunLock; "
        f"RunLock({run_uri!r}).acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
            RunLock(run_uri).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run_uri) as lock:
        assert lock.previous is not None and lock.previous.pid == holder.pid
    assert Path(run_uri, LOCK_NAME).read_bytes() == b""  # released cleanly
    with RunLock(run_uri) as lock:
        assert lock.previous is None

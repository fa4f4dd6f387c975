"""Prefect wiring shared by every flow: environment, caching, result storage,
task runners.

Why a rerun skips finished work: every stage task persists its result under the
run's storage and is keyed by ``INPUTS + TASK_SOURCE + CodeVersion``. Tasks take
and return URIs (never arrays), so keys are cheap and stable across processes.
``CodeVersion`` hashes mapgap's own source: TASK_SOURCE alone only sees the thin
``@task`` wrapper, not the helpers doing the work.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE_DIRS = ("mapgap", "flows", "tasks", "models")


def setup_environment(project_dir: Path | None = None) -> None:
    """Defaults that must be set before prefect/mlflow are imported.

    A project-local PREFECT_HOME (unless the user set one) keeps the ephemeral
    API database next to the project; telemetry is off because we run offline.
    """
    home = (project_dir or Path.cwd()) / ".prefect"
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_UI_ENABLED", "true")
    # The ephemeral API server needs ~9 s; more on a loaded 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Quiet, informative logs: our own lines matter more than Prefect's.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


@cache
def code_version() -> str:
    """Hash of mapgap's Python sources: any code change invalidates cached tasks."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for d in PACKAGE_DIRS:
        pkg = root / d
        if not pkg.is_dir():  # installed (non-editable): everything is under mapgap/
            pkg = Path(__file__).resolve().parent / d
        for path in sorted(pkg.rglob("*.py")):
            h.update(str(path.relative_to(pkg.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _cache_policy() -> Any:
    from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

    @dataclass
    class CodeVersion(CachePolicy):
        """Key part that changes whenever mapgap's code changes."""

        def compute_key(self, task_ctx: Any, inputs: Any, flow_parameters: Any, **kw: Any) -> str:
            return code_version()

    return INPUTS + TASK_SOURCE + CodeVersion()


def stage_task(fn: Any = None, **options: Any) -> Any:
    """``@task`` with mapgap's defaults: persisted results, cache across runs."""
    from prefect import task

    defaults: dict[str, Any] = {
        "cache_policy": _cache_policy(),
        "persist_result": True,
        "retries": 0,
    }
    defaults.update(options)
    if fn is None:
        return lambda f: task(f, **defaults)
    return task(fn, **defaults)


def result_storage_for(run_uri: str) -> Any:
    """Prefect result storage inside the run dir, so any worker can read results.

    Local dirs map to a Path; remote URIs need a saved RemoteFileSystem block.
    """
    from mapgap import storage

    target = storage.join(run_uri, "prefect-results")
    if not storage.is_remote(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        return Path(target)
    from prefect.filesystems import RemoteFileSystem

    slug = "mapgap-" + hashlib.sha1(target.encode()).hexdigest()[:12]
    RemoteFileSystem(basepath=target).save(slug, overwrite=True)
    return f"remote-file-system/{slug}"


def task_runner_for(runner: Any) -> Any:
    """Prefect task runner from ``runner`` config: scale out on Dask or Ray."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if runner.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "process":
        return ProcessPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.address:
            return DaskTaskRunner(address=runner.address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": runner.workers, "threads_per_worker": 1,
                            "processes": True, "dashboard_address": None}
        )
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise RuntimeError("runner.kind: ray needs the extra: pip install 'mapgap[ray]'") from None
    if runner.address:
        return RayTaskRunner(address=runner.address)
    # A local cluster for the flow run, as big as runner.workers (not every core).
    return RayTaskRunner(init_kwargs={"num_cpus": runner.workers})


def configured(flow_obj: Any, cfg: Any) -> Any:
    """A flow bound to a run: results in the run dir, the configured task runner."""
    return flow_obj.with_options(
        result_storage=result_storage_for(cfg.run_uri),
        persist_result=True,
        task_runner=task_runner_for(cfg.runner),
    )


def mark_crashed(tag: str, message: str, failed_since: datetime | None = None) -> list[str]:
    """Set the flow runs tagged ``tag`` that are not final to Crashed.

    For the runs of a process that died (``kill -9``) or is being stopped by a
    signal: nothing else would ever move them out of Running. A stop kills the
    workers, so the flow engine may have failed a run first: runs that became
    Failed at or after ``failed_since`` (the signal) are the stop's too. Best
    effort: an unreachable API must not keep a stopping process alive. Returns
    their ids.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Crashed

    marked: list[str] = []
    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
        for run in runs:
            state = run.state
            by_stop = (failed_since is not None and state is not None and state.is_failed()
                       and state.timestamp >= failed_since)
            if state is None or not state.is_final() or by_stop:
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                marked.append(str(run.id))
    return marked


class _SessionServer:
    """Prefect's temporary API server, but in a session of its own.

    Prefect's ephemeral server shares the CLI's process group, so a Ctrl-C or a
    group SIGTERM kills it at once and the flow engine then loops on
    ConnectError trying to report the crash. Started in its own session it
    outlives the signal long enough for the run to record its end; the CLI
    stops it, and it stops itself when the CLI dies (``kill -9``).
    """

    def __init__(self) -> None:
        from prefect.server.api.server import SubprocessASGIServer

        class Detached(SubprocessASGIServer):
            def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
                real_popen = subprocess.Popen
                try:
                    subprocess.Popen = _detached_popen  # type: ignore[misc]
                    return super()._run_uvicorn_command()
                finally:
                    subprocess.Popen = real_popen  # type: ignore[misc]

        self.server = Detached(port=_free_port())

    @property
    def pid(self) -> int | None:
        proc = self.server.server_process
        return proc.pid if proc else None


def _detached_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
    return _POPEN(*args, preexec_fn=_detach, **kwargs)


_POPEN = subprocess.Popen


def _detach() -> None:
    """In the server's child before exec: a session of its own, and (Linux) a
    SIGTERM when its parent dies, so a ``kill -9`` of the CLI does not orphan it."""
    import signal
    import sys

    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def api_server() -> Iterator[int | None]:
    """The Prefect API for a CLI run: the user's (``PREFECT_API_URL``) when set,
    else a temporary server in its own session, stopped on exit. Yields its pid."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    owned = _SessionServer()
    owned.server.start()
    os.environ["PREFECT_API_URL"] = owned.server.api_url  # for process/Dask/Ray workers
    try:
        with temporary_settings({PREFECT_API_URL: owned.server.api_url}):
            yield owned.pid
    finally:
        _flush_to_api()
        os.environ.pop("PREFECT_API_URL", None)
        owned.server.stop()


def _flush_to_api(timeout_s: float = 5) -> None:
    """Send the queued logs and events while the temporary server still runs:
    at interpreter exit Prefect would retry sending them to a stopped server."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            service.drain_all(timeout=timeout_s)


def recover(cfg: Any, lock: Any) -> None:
    """Clear up after a killed run of this run dir, before running again (caller
    holds the lock): its temporaries go; its flow runs, which still say Running,
    become Crashed; its MLflow runs become KILLED."""
    import sys

    from mapgap import storage, tracking

    swept = storage.sweep_temporaries(cfg.run_uri)
    if swept:
        print(f"mapgap: removed {len(swept)} temporary file(s) of an interrupted run",
              file=sys.stderr)
    previous = lock.previous
    if previous is None:
        return
    why = f"its process ({previous.describe()}) ended without releasing the run dir"
    crashed = mark_crashed(previous.run_tag, f"mapgap: {why}")
    killed = tracking.mark_crashed_runs(cfg, previous.since, why)
    print(f"mapgap: the previous run on {cfg.run_uri} died ({previous.describe()}):"
          f" {len(crashed)} flow run(s) marked Crashed, {len(killed)} MLflow run(s) KILLED",
          file=sys.stderr)


class Stopper:
    """SIGTERM / SIGINT (what ``prefect worker``, systemd, Kubernetes and Ctrl-C
    send) stop a CLI run within seconds: no child left, the flow runs Crashed,
    the MLflow runs KILLED, the lock released, exit code 128 + signal number.

    Signals are seen through :func:`signal.set_wakeup_fd`, read by a thread of
    its own, not through a Python handler: Prefect replaces the SIGTERM handler
    while a flow runs, and its handler only unwinds the main thread, which then
    waits for the running tasks (a training epoch, a stuck read) before the
    process could stop. The C-level handler writes every signal to the wakeup
    fd whichever Python handler is installed, so the stop starts at once and
    ends the process with ``os._exit``.
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, cfg: Any, lock: Any) -> None:
        self.cfg, self.lock = cfg, lock
        self.server_pid: int | None = None  # stopped last: marking states needs it
        self.signum: int | None = None
        self.signalled_at: datetime | None = None
        self._context: Any = None
        self._flow_returned = threading.Event()

    def arm(self) -> Stopper:
        """Listen for the signals (main thread, before the run starts)."""
        import signal
        import socket

        reader, writer = socket.socketpair()
        writer.setblocking(False)
        for name in self.SIGNALS:
            # A Python-level handler makes the C handler write to the wakeup fd;
            # it does nothing itself: the listener thread stops the run.
            signal.signal(getattr(signal, name), lambda signum, frame: None)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._sockets = (reader, writer)
        threading.Thread(target=self._listen, name="mapgap-signals", daemon=True).start()
        return self

    def serving(self, server_pid: int | None) -> None:
        """The API server is up: the stop marks states through it, in this context
        (its Prefect settings name the server), and stops it last."""
        import contextvars

        self.server_pid = server_pid
        self._context = contextvars.copy_context()

    def _listen(self) -> None:
        import signal

        wanted = {int(getattr(signal, name)) for name in self.SIGNALS}
        reader = self._sockets[0]
        while True:
            data = reader.recv(64)
            hit = [signum for signum in data if signum in wanted]
            if hit:
                self.signalled_at = datetime.now(UTC)
                self.signum = hit[0]
                context = self._context
                if context is None:
                    self._stop()
                else:
                    context.run(self._stop)
                return

    def wait_if_stopping(self) -> None:
        """Block the calling thread while the listener thread ends the process.

        Called when the flow has returned: its engine has written the runs'
        final states, which the stop then overwrites (not the other way round).
        """
        if self.signum is not None:
            self._flow_returned.set()
            threading.Event().wait()

    # How long the stop waits, after killing the workers, for the flow engine
    # to finish its runs (a flow blocked elsewhere is marked without waiting).
    SETTLE_S = 5.0

    MARK_TIMEOUT_S = 8.0

    def _mark(self, name: str) -> None:
        from mapgap import tracking

        mark_crashed(self.lock.owner.run_tag, f"mapgap: stopped by {name}", self.signalled_at)
        with contextlib.suppress(Exception):
            tracking.mark_crashed_runs(self.cfg, self.lock.owner.since, f"stopped by {name}")

    def _stop(self) -> None:
        import contextvars
        import signal
        import sys

        from mapgap import workers

        assert self.signum is not None
        name = signal.Signals(self.signum).name
        try:
            server = set(workers.descendants(self.server_pid)) | {self.server_pid} \
                if self.server_pid else set()
            workers.stop_processes([p for p in workers.descendants() if p not in server])
            self._flow_returned.wait(timeout=self.SETTLE_S)
            # Bounded: an unreachable API or tracking server must not keep us alive.
            marking = threading.Thread(target=contextvars.copy_context().run,
                                       args=(self._mark, name), daemon=True)
            marking.start()
            marking.join(timeout=self.MARK_TIMEOUT_S)
        finally:
            workers.stop_processes(workers.descendants())
            self.lock.release()
            sys.stdout.flush()
            sys.stderr.write(f"error: stopped by {name}; a rerun continues from the finished"
                             " tasks\n")
            sys.stderr.flush()
            os._exit(128 + self.signum)

"""The persistent job queue: training runs that survive a restart.

Jobs live in SQLite (WAL) at ``home.jobs_db``: one row per job (method, name, the options needed to run it again,
state, progress, timings, outputs, error) and the loss of every reported step. One worker process per studio home
(``python -m studio.jobs work``, or started by ``studio ui``) runs one job at a time; a file lock held for the worker's
life says whether one is running, so a worker that died (SIGKILL, power loss) is noticed even if its pid was reused.

States: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``; a job found ``running`` by a new
worker was left by a dead one: it becomes ``interrupted`` and runs again, from its newest complete checkpoint
(`trainers.core.checkpoint.latest_checkpoint`) when it has one, until it was interrupted `MAX_ATTEMPTS` times.

>>> store = JobStore(home)  # doctest: +SKIP
>>> job = submit(home, "textual-inversion", name="my-toy", images="photos/",
...              values={"placeholder_token": "<my-toy>", "init_word": "toy"})  # doctest: +SKIP
>>> run_worker(home, once=True)  # doctest: +SKIP
1
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from studio.errors import AlreadyExistsError, InvalidInputError, NotAvailableError, NotFoundError, StudioError
from studio.home import StudioHome, resolve_home

__all__ = [
    "ACTIVE_STATES",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobMethod",
    "JobStore",
    "MAX_ATTEMPTS",
    "METHODS",
    "jobs_from_cli",
    "register_method",
    "run_worker",
    "submit",
    "submit_from_cli",
    "worker_running",
]

logger = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
ACTIVE_STATES = ("queued", "running", "interrupted")
FINISHED_STATES = ("succeeded", "failed", "cancelled")
# A job that kills its worker every time (out of memory, a driver crash) must not loop forever.
MAX_ATTEMPTS = 3
LOCK_FILE = "worker.lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    method TEXT NOT NULL,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    eta_s REAL,
    message TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    outputs TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    run_dir TEXT NOT NULL,
    worker_pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS losses (
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    loss REAL NOT NULL,
    PRIMARY KEY (job_id, step)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""


class JobCancelled(Exception):  # noqa: N818 - a signal, not an error: the user asked for it
    """Raised from a job's progress callback when the user cancelled it; the worker marks the job cancelled."""


# -- jobs -------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One row of the queue, as plain values (``config`` and ``outputs`` decoded from JSON)."""

    id: int
    method: str
    name: str
    config: dict[str, Any]
    state: str
    step: int
    total_steps: int
    eta_s: float | None
    message: str
    created: float
    started: float | None
    finished: float | None
    outputs: dict[str, Any]
    error: str
    run_dir: str
    worker_pid: int | None
    attempts: int
    cancel_requested: bool

    @property
    def fraction(self) -> float:
        """Share of the steps done, in [0, 1]."""
        return min(1.0, self.step / self.total_steps) if self.total_steps > 0 else 0.0

    @property
    def elapsed_s(self) -> float | None:
        """Seconds from start to finish (or to now while running)."""
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (what ``studio jobs show --json`` prints)."""
        return {**asdict(self), "fraction": self.fraction, "elapsed_s": self.elapsed_s}

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        values["config"] = json.loads(values["config"])
        values["outputs"] = json.loads(values["outputs"])
        values["cancel_requested"] = bool(values["cancel_requested"])
        return cls(**values)


class JobStore:
    """The job database of one studio home. Safe to use from several processes and threads (one connection per
    call; SQLite WAL lets the UI read while the worker writes).

    >>> store = JobStore(StudioHome(Path(tempfile.mkdtemp())))  # doctest: +SKIP
    >>> store.list()  # doctest: +SKIP
    []
    """

    def __init__(self, home: StudioHome) -> None:
        self.home = home
        self.path = home.jobs_db
        self._init_lock = threading.Lock()
        self._ready = False

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self._ensure_schema()
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA busy_timeout=30000")
            # In WAL mode NORMAL loses nothing when a process dies, only on power loss, and saves an fsync per step.
            connection.execute("PRAGMA synchronous=NORMAL")
            yield connection
        finally:
            connection.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front: a read-then-write (claim, cancel) cannot interleave.
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _ensure_schema(self) -> None:
        with self._init_lock:
            if self._ready:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.executescript(_SCHEMA)
            finally:
                connection.close()
            self._ready = True

    # -- reading ---------------------------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        """The job with this id; `NotFoundError` if there is none."""
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise NotFoundError(f"expected a job with id {job_id}, found none (see `studio jobs list`)")
        return Job._from_row(row)

    def list(self, states: Sequence[str] | None = None, *, limit: int | None = None) -> list[Job]:
        """Jobs, newest first, optionally only those in ``states``."""
        query, params = "SELECT * FROM jobs", []
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
            params.extend(states)
        query += " ORDER BY id DESC"
        if limit is not None:
            query += " LIMIT ?"
            params.append(int(limit))
        with self._connect() as connection:
            return [Job._from_row(row) for row in connection.execute(query, params)]

    def losses(self, job_id: int) -> list[tuple[int, float]]:
        """The loss history of a job as ``(step, loss)``, in step order."""
        with self._connect() as connection:
            rows = connection.execute("SELECT step, loss FROM losses WHERE job_id = ? ORDER BY step", (int(job_id),))
            return [(int(step), float(loss)) for step, loss in rows]

    # -- user actions ----------------------------------------------------------------------------------------------

    def add(self, method: str, name: str, config: Mapping[str, Any], *, run_dir: Path | None = None) -> Job:
        """Insert a queued job (no validation: use `submit`) and return it."""
        with self._transaction() as connection:
            cursor = connection.execute(
                "INSERT INTO jobs (method, name, config, state, created, run_dir) VALUES (?, ?, ?, 'queued', ?, '')",
                (method, name, json.dumps(dict(config), default=str), time.time()),
            )
            job_id = int(cursor.lastrowid)
            # Every job has its own run folder: two runs of one name never share checkpoints.
            folder = run_dir or self.home.runs / f"job-{job_id}-{method}-{name}"
            connection.execute("UPDATE jobs SET run_dir = ? WHERE id = ?", (str(folder), job_id))
        return self.get(job_id)

    def cancel(self, job_id: int) -> Job:
        """Cancel a waiting job now, or ask a running one to stop after its current step."""
        with self._transaction() as connection:
            job = self._locked_get(connection, job_id)
            if job.state in ("queued", "interrupted"):
                connection.execute(
                    "UPDATE jobs SET state = 'cancelled', finished = ?, message = 'cancelled before it ran' "
                    "WHERE id = ?",
                    (time.time(), job.id),
                )
            elif job.state == "running":
                connection.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job.id,))
            else:
                raise InvalidInputError(f"expected a queued or running job, found job {job.id} {job.state}")
        return self.get(job_id)

    def resume(self, job_id: int) -> Job:
        """Queue an interrupted, failed or cancelled job again; it continues from its newest checkpoint, if any."""
        with self._transaction() as connection:
            job = self._locked_get(connection, job_id)
            if job.state not in ("interrupted", "failed", "cancelled"):
                raise InvalidInputError(
                    f"expected an interrupted, failed or cancelled job, found job {job.id} {job.state}"
                )
            connection.execute(
                "UPDATE jobs SET state = 'queued', error = '', message = 'queued again', finished = NULL, "
                "cancel_requested = 0, attempts = 0, worker_pid = NULL WHERE id = ?",
                (job.id,),
            )
        return self.get(job_id)

    # -- the worker's side -----------------------------------------------------------------------------------------

    def claim(self, worker_pid: int) -> Job | None:
        """Take the oldest waiting job (queued, or interrupted and to be resumed) and mark it running."""
        with self._transaction() as connection:
            row = connection.execute(
                "SELECT id FROM jobs WHERE state IN ('queued', 'interrupted') ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            connection.execute(
                "UPDATE jobs SET state = 'running', worker_pid = ?, attempts = attempts + 1, "
                "started = COALESCE(started, ?), error = '' WHERE id = ?",
                (worker_pid, now, row["id"]),
            )
        return self.get(row["id"])

    def record(self, job_id: int, step: int, total_steps: int, *, loss: float | None = None, **extra: Any) -> bool:
        """Store one progress report; returns whether the user asked the job to stop.

        ``extra`` may hold ``eta_s``, ``message`` and ``samples`` (paths appended to the job's outputs).
        """
        samples = [str(path) for path in extra.get("samples", ())]
        with self._transaction() as connection:
            connection.execute(
                "UPDATE jobs SET step = ?, total_steps = ?, eta_s = ?, message = COALESCE(?, message) WHERE id = ?",
                (int(step), int(total_steps), extra.get("eta_s"), extra.get("message") or None, int(job_id)),
            )
            if loss is not None:
                connection.execute(
                    "INSERT OR REPLACE INTO losses (job_id, step, loss) VALUES (?, ?, ?)",
                    (int(job_id), int(step), float(loss)),
                )
            if samples:
                outputs = json.loads(
                    connection.execute("SELECT outputs FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
                )
                outputs["samples"] = [*outputs.get("samples", []), *samples]
                connection.execute("UPDATE jobs SET outputs = ? WHERE id = ?", (json.dumps(outputs), int(job_id)))
            row = connection.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        return bool(row and row[0])

    def finish(
        self, job_id: int, state: str, *, outputs: Mapping[str, Any] | None = None, error: str = "", message: str = ""
    ) -> Job:
        """Mark a job finished (or interrupted) with its outputs (merged into what is recorded) or error."""
        if state not in (*FINISHED_STATES, "interrupted"):
            raise ValueError(f"finish() expects a final state or 'interrupted', got {state!r}")
        with self._transaction() as connection:
            job = self._locked_get(connection, job_id)
            merged = {**job.outputs, **dict(outputs or {})}
            # A worker stopped on purpose (Ctrl-C, SIGTERM) is not a crash: that start does not count as an attempt.
            attempts = max(0, job.attempts - 1) if state == "interrupted" else job.attempts
            connection.execute(
                "UPDATE jobs SET state = ?, outputs = ?, error = ?, message = ?, finished = ?, eta_s = NULL, "
                "worker_pid = NULL, attempts = ? WHERE id = ?",
                (
                    state,
                    json.dumps(merged, default=str),
                    " ".join(error.split()),
                    message,
                    time.time() if state in FINISHED_STATES else None,
                    attempts,
                    job.id,
                ),
            )
        return self.get(job_id)

    def recover(self) -> list[Job]:
        """Mark jobs left ``running`` by a dead worker as interrupted (to be resumed), or failed after
        `MAX_ATTEMPTS` starts; call only while holding the worker lock. Returns the jobs it changed."""
        with self._transaction() as connection:
            stale = [Job._from_row(row) for row in connection.execute("SELECT * FROM jobs WHERE state = 'running'")]
            for job in stale:
                where = f"the worker (pid {job.worker_pid}) stopped at step {job.step} of {job.total_steps}"
                if job.cancel_requested:
                    state, error, message = "cancelled", "", f"cancelled; {where}"
                elif job.attempts >= MAX_ATTEMPTS:
                    state, message = "failed", ""
                    error = f"{where}, the {job.attempts}th time this job was started; not retrying it"
                else:
                    state, error, message = "interrupted", "", f"{where}; it will resume from its last checkpoint"
                connection.execute(
                    "UPDATE jobs SET state = ?, error = ?, message = ?, worker_pid = NULL, eta_s = NULL, "
                    "finished = ? WHERE id = ?",
                    (state, error, message, time.time() if state != "interrupted" else None, job.id),
                )
        return [self.get(job.id) for job in stale]

    def _locked_get(self, connection: sqlite3.Connection, job_id: int) -> Job:
        row = connection.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise NotFoundError(f"expected a job with id {job_id}, found none (see `studio jobs list`)")
        return Job._from_row(row)


# -- methods ----------------------------------------------------------------------------------------------------------


@dataclass
class JobContext:
    """What a method's runner gets: the job, where to write, how to report, and whether to continue a checkpoint."""

    job: Job
    home: StudioHome
    run_dir: Path
    progress: Callable[[Any], None]
    resume: bool


@dataclass(frozen=True)
class JobMethod:
    """A training method the queue can run.

    ``prepare(options) -> options`` validates and normalises a submission (raising `StudioError` before anything is
    queued), e.g. turning CLI flags into the effective config; ``run(context) -> outputs`` trains and returns
    JSON-ready outputs (``adapter``, ``path``...). ``cli_flags`` maps ``studio train`` options to config keys.
    """

    name: str
    run: Callable[[JobContext], Mapping[str, Any]]
    prepare: Callable[[dict[str, Any]], dict[str, Any]] = lambda options: options
    cli_flags: Mapping[str, str] = field(default_factory=dict)
    option_flags: tuple[str, ...] = ()
    needs_images: bool = True
    """Whether a run needs a folder of training images (preference runs read pairs instead)."""
    """``studio train`` options kept beside the config (not config keys), e.g. ``user`` and ``pairs``."""


METHODS: dict[str, JobMethod] = {}


def register_method(method: JobMethod) -> JobMethod:
    """Make ``method`` runnable by the queue in this process (tests register fast fake methods)."""
    METHODS[method.name] = method
    return method


def _config_method(
    name: str,
    config_class: str,
    train: Callable[[Any, dict[str, Any], JobContext], Mapping[str, Any]],
    option_flags: tuple[str, ...] = (),
    needs_images: bool = True,
    recipes: str = "",
    **flags: str,
) -> JobMethod:
    """A method whose options hold its effective config (from `trainers.core.config.load_config`). ``recipes`` names
    the trainer's measured defaults per base model (e.g. `trainers.neti.BASE_RECIPES`); the job's base model's entry
    applies under the job's own values, as in the trainer's CLI."""

    def imported(dotted: str) -> Any:
        module, _, attribute = dotted.rpartition(".")
        return getattr(__import__(module, fromlist=[attribute]), attribute)

    def config_class_object() -> type:
        return imported(config_class)

    def prepare(options: dict[str, Any]) -> dict[str, Any]:
        from trainers.core.config import config_to_dict, load_config, recipe_for

        cls = config_class_object()
        config = load_config(
            cls,
            recipe=recipe_for(imported(recipes), options.get("base")) if recipes else None,
            toml_path=options.pop("config_file", None),
            values=options.get("config") or {},
            overrides=options.pop("set", None) or [],
        )
        return {**options, "config": config_to_dict(config)}

    def run(context: JobContext) -> Mapping[str, Any]:
        from trainers.core.config import config_from_dict

        config = config_from_dict(config_class_object(), context.job.config["config"])
        return train(config, context.job.config, context)

    return JobMethod(
        name=name, run=run, prepare=prepare, cli_flags=flags, option_flags=option_flags, needs_images=needs_images
    )


def _train_textual_inversion(config: Any, options: dict[str, Any], context: JobContext) -> Mapping[str, Any]:
    from studio.library import AdapterLibrary
    from trainers.textual_inversion import train_textual_inversion

    info = train_textual_inversion(
        config,
        options["images"],
        options.get("base") or "tiny",
        name=context.job.name,
        library=AdapterLibrary(context.home),
        run_dir=context.run_dir,
        progress=context.progress,
        resume=context.resume,
    )
    return {"adapter": info.name, "path": str(info.path)}


def _train_dreambooth(config: Any, options: dict[str, Any], context: JobContext) -> Mapping[str, Any]:
    from studio.base_models import load_base_model
    from studio.library import AdapterLibrary
    from trainers.dreambooth import train_dreambooth

    result = train_dreambooth(
        config,
        options["images"],
        load_base_model(options.get("base") or "tiny"),
        name=context.job.name,
        library=AdapterLibrary(context.home),
        run_dir=context.run_dir,
        progress=[context.progress],
        resume=context.resume,
    )
    return {"adapter": result.name, "path": str(result.path)}


def _train_neti(config: Any, options: dict[str, Any], context: JobContext) -> Mapping[str, Any]:
    from pipelines.service import default_device
    from studio.base_models import load_base_model
    from studio.library import AdapterLibrary
    from trainers.neti import train_neti

    adapter = train_neti(
        config,
        load_base_model(options.get("base") or "tiny"),
        options["images"],
        run_dir=context.run_dir,
        device=default_device(),
        callbacks=[context.progress],
        resume=context.resume,
    )
    info = AdapterLibrary(context.home).add(adapter, context.job.name)
    return {"adapter": info.name, "path": str(info.path)}


def _train_preference(config: Any, options: dict[str, Any], context: JobContext) -> Mapping[str, Any]:
    from studio.base_models import load_base_model
    from studio.library import AdapterLibrary
    from studio.preferences import load_pairs
    from trainers.preference import train_population, train_user_preference

    if config.mode == "embed":
        raise NotAvailableError(
            "queueing an 'embed' preference run is not available; it takes seconds, run it directly"
        )
    user = options.get("user")
    pairs = load_pairs(options.get("pairs") or context.home.preferences, user=user if config.mode == "user" else None)
    base = load_base_model(options.get("base") or "tiny")
    if config.mode == "population":
        adapter = train_population(config, pairs, base, progress=[context.progress])
    else:
        adapter = train_user_preference(config, pairs, base, user_id=user, progress=[context.progress])
    adapter.metadata.name = context.job.name
    info = AdapterLibrary(context.home).add(adapter, context.job.name)
    return {"adapter": info.name, "path": str(info.path), "pairs": len(pairs)}


for _method in (
    _config_method(
        "textual-inversion",
        "trainers.textual_inversion.TextualInversionConfig",
        _train_textual_inversion,
        recipes="trainers.textual_inversion.BASE_RECIPES",
        token="placeholder_token",
        init_word="init_word",
        num_vectors="num_vectors",
    ),
    _config_method(
        "dreambooth",
        "trainers.dreambooth.DreamBoothConfig",
        _train_dreambooth,
        recipes="trainers.dreambooth.BASE_RECIPES",
        token="token",
        class_noun="class_noun",
    ),
    _config_method(
        "neti",
        "trainers.neti.NetiConfig",
        _train_neti,
        recipes="trainers.neti.BASE_RECIPES",
        token="placeholder_token",
        super_category="super_category",
    ),
    _config_method(
        "preference",
        "trainers.preference.PreferenceConfig",
        _train_preference,
        option_flags=("user", "pairs"),
        needs_images=False,
    ),
):
    register_method(_method)


# -- submitting -------------------------------------------------------------------------------------------------------


def submit(
    home: StudioHome,
    method: str,
    *,
    name: str,
    images: str | os.PathLike[str] | None = None,
    base: str = "tiny",
    values: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    config_file: str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Job:
    """Check a training request and queue it; returns the queued job.

    ``values`` are config options (e.g. ``{"placeholder_token": "<my-toy>", "init_word": "toy"}``), ``overrides``
    ``key=value`` strings as from ``--set``, ``options`` the method's other options (a preference run's ``user``).
    Everything is validated now, so a typo fails here, not in the worker.
    """
    from studio.library import AdapterLibrary, sanitize_name

    # 1. The method, the name (free in the library and among waiting jobs) and the images.
    spec = METHODS.get(method)
    if spec is None:
        raise NotAvailableError(f"expected a queueable method ({', '.join(sorted(METHODS))}), found '{method}'")
    name = sanitize_name(name)
    if AdapterLibrary(home).exists(name):
        raise AlreadyExistsError(f"an adapter named '{name}' already exists; choose another name or remove it first")
    store = JobStore(home)
    for job in store.list(ACTIVE_STATES):
        if job.name == name:
            raise AlreadyExistsError(f"job {job.id} ({job.state}) already trains an adapter named '{name}'")
    options = {**dict(options or {}), "base": base, "config": dict(values or {}), "set": list(overrides)}
    if images is None and spec.needs_images:
        raise InvalidInputError(f"expected a folder of training images for a {method} run, found none")
    if images is not None:
        folder = Path(images).expanduser().resolve()
        if not folder.is_dir():
            raise InvalidInputError(f"expected a folder of training images, found no folder at {images}")
        options["images"] = str(folder)
    if config_file is not None:
        options["config_file"] = str(Path(config_file).expanduser().resolve())

    # 2. The method's own checks: the effective config, built once and stored with the job.
    options = spec.prepare(options)
    options.pop("set", None)
    options.pop("config_file", None)
    home.ensure()
    return store.add(method, name, options)


def submit_from_cli(args: argparse.Namespace, home: StudioHome) -> int:
    """``studio train METHOD ... --queue``: queue the run for the background worker and print the job id."""
    if getattr(args, "resume", None):
        raise InvalidInputError("expected --queue without --resume; continue a queued run with `studio jobs resume ID`")
    if not args.name:
        raise InvalidInputError("expected --name NAME for the trained adapter, found none")
    spec = METHODS.get(args.method)
    if spec is None:
        raise NotAvailableError(f"queueing a {args.method} run is not available yet; run it without --queue")
    values = {key: getattr(args, flag) for flag, key in spec.cli_flags.items() if getattr(args, flag, None) is not None}
    extra = {flag: getattr(args, flag) for flag in spec.option_flags if getattr(args, flag, None) is not None}
    job = submit(
        home,
        args.method,
        name=args.name,
        images=args.images,
        base=args.base or "tiny",
        values=values,
        overrides=args.set or [],
        config_file=args.config,
        options=extra,
    )
    print(f"queued job {job.id}: {job.method} '{job.name}' (follow it with `studio jobs show {job.id}`)")
    if not worker_running(home):
        print("no worker is running for this studio home; start one with `studio ui` or `python -m studio.jobs work`")
    return 0


# -- the worker -------------------------------------------------------------------------------------------------------


class _WorkerLock:
    """An exclusive lock on ``home/worker.lock`` for the worker's life (released by the OS when it dies)."""

    def __init__(self, home: StudioHome) -> None:
        self.path = home.root / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def worker_running(home: StudioHome) -> bool:
    """Whether a worker (in any process) currently serves this studio home."""
    if not (home.root / LOCK_FILE).exists():
        return False
    probe = _WorkerLock(home)
    if probe.acquire():
        probe.release()
        return False
    return True


class _JobProgress:
    """The progress callback given to a trainer: records each event and stops the run when it was cancelled."""

    def __init__(self, store: JobStore, job_id: int) -> None:
        self.store = store
        self.job_id = job_id

    def __call__(self, event: Any) -> None:
        cancel = self.store.record(
            self.job_id,
            event.step,
            event.total_steps,
            loss=event.loss,
            eta_s=event.eta_s,
            message=event.message,
            samples=event.samples,
        )
        if cancel:
            raise JobCancelled(f"job {self.job_id} was cancelled at step {event.step}")


def run_job(store: JobStore, job: Job) -> Job:
    """Run one claimed job to its end in this process and record how it ended."""
    from trainers.core.checkpoint import latest_checkpoint

    spec = METHODS.get(job.method)
    if spec is None:
        return store.finish(job.id, "failed", error=f"this worker cannot run '{job.method}' jobs")
    run_dir = Path(job.run_dir)
    resume = latest_checkpoint(run_dir) is not None
    context = JobContext(job=job, home=store.home, run_dir=run_dir, progress=_JobProgress(store, job.id), resume=resume)
    logger.info("job %d: %s '%s'%s", job.id, job.method, job.name, " (resuming)" if resume else "")
    try:
        outputs = spec.run(context)
    except JobCancelled:
        return store.finish(job.id, "cancelled", message="cancelled by the user")
    except StudioError as exc:
        return store.finish(job.id, "failed", error=str(exc))
    except Exception as exc:
        # The worker's boundary: a bug in one job must not stop the queue; the traceback goes to the worker's log.
        logger.exception("job %d failed", job.id)
        return store.finish(job.id, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
    except BaseException:
        # Ctrl-C or SIGTERM: the job did not fail; the next worker resumes it.
        store.finish(job.id, "interrupted", message="the worker was stopped; it will resume from its last checkpoint")
        raise
    return store.finish(job.id, "succeeded", outputs=dict(outputs), message="done")


def run_worker(
    home: StudioHome, *, once: bool = False, poll_s: float = 1.0, stop: threading.Event | None = None
) -> int:
    """Serve the queue of ``home``: recover jobs of a dead worker, then run waiting jobs one at a time.

    With ``once`` it returns when no job is waiting; otherwise it polls every ``poll_s`` seconds until ``stop`` is
    set. Returns the number of jobs run; raises `AlreadyExistsError` if another worker serves this home.
    """
    home.ensure()
    lock = _WorkerLock(home)
    if not lock.acquire():
        raise AlreadyExistsError(f"a worker is already running for {home.root} (lock {lock.path})")
    store = JobStore(home)
    count = 0
    try:
        for job in store.recover():
            logger.warning("job %d: %s %s", job.id, job.state, job.error or job.message)
        while stop is None or not stop.is_set():
            job = store.claim(os.getpid())
            if job is None:
                if once:
                    break
                if stop is not None:
                    stop.wait(poll_s)
                else:
                    time.sleep(poll_s)
                continue
            run_job(store, job)
            count += 1
    finally:
        lock.release()
    return count


def start_worker_process(home: StudioHome, *, log_path: Path | None = None) -> Any:
    """Start ``python -m studio.jobs work`` for ``home`` in the background unless a worker already serves it.

    Returns the `subprocess.Popen` (None when one is running already); its log goes to ``home/worker.log``.
    """
    import subprocess

    if worker_running(home):
        return None
    home.ensure()
    log = (log_path or home.root / "worker.log").open("a")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "studio.jobs", "work", "--home", str(home.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        log.close()


# -- CLI --------------------------------------------------------------------------------------------------------------


def _job_id(text: Any) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise InvalidInputError(f"expected a job id (a number, see `studio jobs list`), found '{text}'") from None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _stamp(value: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value)) if value else "-"


def jobs_from_cli(args: argparse.Namespace, home: StudioHome) -> int:
    """``studio jobs list|show ID|cancel ID|resume ID`` (``--json`` for list and show)."""
    store = JobStore(home)
    if args.action == "list":
        jobs = store.list()
        if getattr(args, "json", False):
            print(json.dumps([job.to_dict() for job in jobs], indent=2, default=str))
        elif not jobs:
            print(f"no jobs in {home.jobs_db}")
        else:
            rows = [
                [
                    str(j.id),
                    j.state,
                    j.method,
                    j.name,
                    f"{j.step}/{j.total_steps}",
                    _duration(j.eta_s),
                    _stamp(j.created),
                ]
                for j in jobs
            ]
            header = ["ID", "STATE", "METHOD", "NAME", "STEP", "ETA", "CREATED"]
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
            for line in [header, *rows]:
                print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        return 0
    job_id = _job_id(args.id)
    if args.action == "show":
        job = store.get(job_id)
        losses = store.losses(job_id)
        if getattr(args, "json", False):
            print(json.dumps({**job.to_dict(), "losses": losses}, indent=2, default=str))
            return 0
        info = job.to_dict()
        info["progress"] = f"{job.step}/{job.total_steps} ({job.fraction:.0%}), ETA {_duration(job.eta_s)}"
        info["last_loss"] = f"{losses[-1][1]:.5f} at step {losses[-1][0]}" if losses else "-"
        for key in ("created", "started", "finished"):
            info[key] = _stamp(info[key])
        for key in ("fraction", "step", "total_steps", "eta_s", "cancel_requested", "elapsed_s"):
            info.pop(key)
        for key, value in info.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
        return 0
    if args.action == "cancel":
        job = store.cancel(job_id)
        if job.state == "cancelled":
            print(f"cancelled job {job.id}")
        else:
            print(f"asked job {job.id} to stop; it stops after its current step")
        return 0
    if args.action == "resume":
        job = store.resume(job_id)
        print(f"queued job {job.id} again; it continues from its last checkpoint if it has one")
        return 0
    raise InvalidInputError(f"expected list, show, cancel or resume, found '{args.action}'")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m studio.jobs work [--home DIR] [--once]``: run the queue's worker in the foreground."""
    parser = argparse.ArgumentParser(prog="python -m studio.jobs", description="the studio's job queue worker")
    parser.add_argument("action", choices=["work"])
    parser.add_argument("--home", help="studio home folder (else $STUDIO_HOME, else ./studio-home)")
    parser.add_argument("--once", action="store_true", help="return when no job is waiting")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between looks at the queue")
    args = parser.parse_args(argv)
    # SIGTERM (a service manager, `kill`) stops the worker like Ctrl-C: the running job is marked interrupted.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        run_worker(resolve_home(args.home), once=args.once, poll_s=args.poll)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

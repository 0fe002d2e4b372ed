"""``studio ui`` as a child process: start it in its own process group, wait until it answers, stop or kill it.

Tests and benchmarks drive the app the way a user runs it (a separate ``studio ui`` process that starts the job
worker), and must never leave a server or a worker behind: the worker is a child of the UI process and shares its
process group, so signalling the group reaches both.

>>> server = UIProcess.start(StudioHome(Path("/tmp/home")), port=free_port(), log_path=Path("/tmp/ui.log"))
... # doctest: +SKIP
>>> server.url  # doctest: +SKIP
'http://127.0.0.1:40123/'
>>> server.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from studio.home import StudioHome
from studio.jobs import LOCK_FILE


class UIStartError(RuntimeError):
    """``studio ui`` exited or did not answer in time (a broken setup, not a user error)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class UIProcess:
    """A running ``studio ui`` (and the worker it started), in a process group of its own."""

    process: subprocess.Popen
    home: StudioHome
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        """The app's address."""
        return f"http://127.0.0.1:{self.port}/"

    @classmethod
    def start(
        cls,
        home: StudioHome,
        *,
        port: int,
        log_path: Path,
        base_model: str = "tiny",
        env: Mapping[str, str] | None = None,
        timeout_s: float = 300.0,
    ) -> UIProcess:
        """Run ``studio --home HOME ui --port PORT`` on ``base_model`` and return once the page answers."""
        environment = {
            **os.environ,
            "STUDIO_BASE_MODEL": base_model,
            "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            **dict(env or {}),
        }
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "studio.cli", "--home", str(home.root), "ui", "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                # A new session: the UI and its worker form one group that stop() and kill() reach together.
                start_new_session=True,
            )
        server = cls(process=process, home=home, port=port, log_path=log_path)
        try:
            server.wait_ready(timeout_s)
        except BaseException:
            server.kill()
            raise
        return server

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until the page answers; `UIStartError` (with the log's end) if the process exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UIStartError(f"studio ui exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            time.sleep(0.5)
        raise UIStartError(f"studio ui did not answer on {self.url} within {timeout_s:.0f}s: {self.log_tail()}")

    def worker_pid(self) -> int | None:
        """The pid the job worker wrote into the home's lock file (None before it started)."""
        try:
            text = (self.home.root / LOCK_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def pids(self) -> list[int]:
        """Live processes of this server's group (the UI and its worker)."""
        return [pid for pid in (self.process.pid, self.worker_pid()) if pid is not None and _alive(pid, self.pgid)]

    @property
    def pgid(self) -> int:
        """The process group: the UI's pid (it leads its own session)."""
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the whole group at once (UI and worker), as a crash or power loss would, and reap the UI."""
        _signal_group(self.pgid, signal.SIGKILL)
        self.process.wait()
        _wait_group_gone(self.pgid, 10.0)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the group (the worker marks its job interrupted), then SIGKILL whatever is left."""
        _signal_group(self.pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        if not _wait_group_gone(self.pgid, timeout_s):
            _signal_group(self.pgid, signal.SIGKILL)
            self.process.wait()
            _wait_group_gone(self.pgid, 10.0)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log (and the worker's), for error messages."""
        parts = []
        for path in (self.log_path, self.home.root / "worker.log"):
            if path.is_file():
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # already gone


def _alive(pid: int, pgid: int) -> bool:
    try:
        return os.getpgid(pid) == pgid and _state(pid) != "Z"
    except ProcessLookupError:
        return False


def _state(pid: int) -> str:
    # A killed child of another process stays a zombie until reaped; it no longer runs, so it counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "X"


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Whether every process of the group is gone (or a zombie) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _group_members(pgid):
            return True
        time.sleep(0.1)
    return not _group_members(pgid)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            # Fields after the command: state, ppid, pgrp.
            if int(stat[2]) == pgid and stat[0] != "Z":
                members.append(int(entry.name))
    return members

"""A crash mid-training: SIGKILL `studio ui` and its job worker while a real textual-inversion job runs, start
`studio ui` again, and the job resumes from its checkpoint and finishes with exactly one complete adapter.

A user would notice a failure here as a training run lost (or restarted from step 0) after a power cut, or a broken
or duplicated adapter in their library.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from studio.home import StudioHome

pytestmark = pytest.mark.slow

STEPS = 300
CHECKPOINT_EVERY = 30


def _wait(what: str, check, timeout_s: float, server=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    log = server.log_tail() if server is not None else ""
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{log}")


@pytest.fixture
def servers():
    """Every `studio ui` a test starts; whatever still runs at the end is killed with its whole process group."""
    started = []
    yield started
    for server in started:
        server.stop(timeout_s=10)
        assert not server.pids(), f"processes of studio ui (group {server.pgid}) survived the test"


def test_sigkill_ui_and_worker_mid_job_then_restart_resumes_and_finishes_one_whole_adapter(tmp_path, servers):
    from gradio_client import Client, handle_file

    from studio.adapter_files import load_adapter
    from studio.jobs import JobStore
    from studio.library import AdapterLibrary
    from studio.world.concepts import SHIPPED_CONCEPTS, write_reference_folder
    from trainers.core.checkpoint import latest_checkpoint
    from ui.process import UIProcess, free_port

    home = StudioHome(tmp_path / "home").ensure()
    photos = write_reference_folder(SHIPPED_CONCEPTS["robot-toy"], tmp_path / "photos")
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    # 1. `studio ui` (which starts the worker); a real textual-inversion job on tiny, submitted as the page does.
    first = UIProcess.start(home, port=free_port(), log_path=tmp_path / "ui-1.log", env=env)
    servers.append(first)
    client = Client(first.url, verbose=False)
    status, _, _ = client.predict(
        [handle_file(str(p)) for p in photos], "textual-inversion", "robot", "<robot>", "toy", STEPS, 0, 1, 4, 0,
        f"checkpoint_every={CHECKPOINT_EVERY}", api_name="/queue_training",
    )  # fmt: skip
    assert status.startswith("queued job"), status
    job_id = int(status.split()[2].rstrip(":"))
    store = JobStore(home)
    run_dir = Path(store.get(job_id).run_dir)

    # 2. Once a checkpoint is on disk, kill the UI and the worker at once, as a power cut would.
    checkpoint = _wait("the first checkpoint", lambda: latest_checkpoint(run_dir), 300, first)
    worker_pid = first.worker_pid()
    assert worker_pid is not None and worker_pid != first.process.pid
    assert set(first.pids()) == {first.process.pid, worker_pid}
    first.kill()
    assert not first.pids(), "the UI or the worker survived SIGKILL"
    killed = store.get(job_id)
    assert killed.state == "running" and killed.step < STEPS, (killed.state, killed.step)
    checkpoint_step = int(latest_checkpoint(run_dir).name.rsplit("-", 1)[1])
    assert checkpoint_step >= int(checkpoint.name.rsplit("-", 1)[1])
    assert not AdapterLibrary(home).exists("robot")

    # 3. Start again: the new worker finds the job left running, resumes it from the checkpoint and finishes it.
    second = UIProcess.start(home, port=free_port(), log_path=tmp_path / "ui-2.log", env=env)
    servers.append(second)
    client = Client(second.url, verbose=False)
    finished = _wait(
        "the job to finish",
        lambda: (job := client.predict(str(job_id), api_name="/job"))["state"] in ("succeeded", "failed") and job,
        600,
        second,
    )
    assert finished["state"] == "succeeded", finished["error"]
    assert (finished["step"], finished["total_steps"]) == (STEPS, STEPS)
    assert finished["attempts"] == 2  # the killed start and the resumed one, nothing more
    worker_log = (home.root / "worker.log").read_text()
    assert f"job {job_id}: textual-inversion 'robot' (resuming)" in worker_log
    assert f"from step {checkpoint_step}" in worker_log, worker_log[-2000:]
    assert [step for step, _ in store.losses(job_id)] == list(range(1, STEPS + 1))

    # 4. Exactly one complete adapter, and nothing half-written beside it.
    assert [info.name for info in AdapterLibrary(home).list()] == ["robot"]
    assert sorted(p.name for p in home.adapters.iterdir()) == ["robot.safetensors"]
    adapter = load_adapter(home.adapters / "robot.safetensors")
    assert adapter.metadata.kind == "textual_inversion" and adapter.metadata.placeholder_tokens == ["<robot>"]

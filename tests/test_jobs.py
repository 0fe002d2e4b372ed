"""The job queue: what a user sees through `studio jobs` and what survives a crashed worker.

Jobs run a fake, fast "method" registered here (no training), whose checkpoints go through
`trainers.core.checkpoint` like the real trainers' do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.cli import main
from studio.errors import AlreadyExistsError, InvalidInputError, NotFoundError
from studio.home import StudioHome
from studio.jobs import (
    MAX_ATTEMPTS,
    JobContext,
    JobMethod,
    JobStore,
    register_method,
    run_worker,
    submit,
    worker_running,
)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _fake_prepare(options: dict) -> dict:
    steps = options["config"].get("steps")
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"config key 'steps' expects a positive int, got '{steps}'")
    return options


def _fake_run(context: JobContext) -> dict:
    """Counts to ``steps`` reporting loss 1/step; checkpoints every ``every`` steps; can cancel itself or fail."""
    import torch

    from trainers.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from trainers.core.progress import ProgressReporter

    config = context.job.config["config"]
    start = 0
    if context.resume:
        start = int(load_checkpoint(latest_checkpoint(context.run_dir))["step"])
    reporter = ProgressReporter(config["steps"], [context.progress], start_step=start)
    for step in range(start + 1, config["steps"] + 1):
        time.sleep(config.get("delay", 0.0))
        if config.get("fail_at") == step:
            raise InvalidInputError(f"fake failure at step {step}")
        reporter.step(step, loss=1.0 / step)
        if config.get("every") and step % config["every"] == 0:
            save_checkpoint(context.run_dir, step, {"weights": {"w": torch.full((2,), float(step))}})
        if config.get("cancel_at") == step:
            JobStore(context.home).cancel(context.job.id)  # as if the user clicked "cancel" now
    return {"adapter": context.job.name, "resumed_from": start}


FAKE = register_method(JobMethod(name="fake", run=_fake_run, prepare=_fake_prepare, needs_images=False))


def _submit(home: StudioHome, name: str = "toy", **config) -> int:
    config.setdefault("steps", 5)
    return submit(home, "fake", name=name, values=config).id


def _cli(capsys, home: StudioHome, *argv: str) -> tuple[int, str, str]:
    code = main(["--home", str(home.root), "jobs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_submitted_job_is_listed_queued_and_shown(capsys, home):
    job_id = _submit(home)
    code, out, _ = _cli(capsys, home, "list", "--json")
    assert code == 0
    [listed] = json.loads(out)
    assert (listed["id"], listed["state"], listed["method"], listed["name"]) == (job_id, "queued", "fake", "toy")
    code, out, _ = _cli(capsys, home, "list")
    assert "queued" in out and "toy" in out
    code, out, _ = _cli(capsys, home, "show", str(job_id), "--json")
    shown = json.loads(out)
    assert shown["config"]["config"] == {"steps": 5} and shown["losses"] == []
    assert Path(shown["run_dir"]).parent == home.runs


def test_bad_submissions_fail_before_anything_is_queued(home):
    with pytest.raises(InvalidInputError, match="steps"):
        submit(home, "fake", name="toy", values={"steps": 0})
    _submit(home)
    with pytest.raises(AlreadyExistsError, match="already trains an adapter named 'toy'"):
        _submit(home)
    with pytest.raises(InvalidInputError, match="folder of training images"):
        submit(home, "fake", name="other", images=home.root / "missing", values={"steps": 1})
    assert len(JobStore(home).list()) == 1


def test_the_worker_runs_a_job_to_success_and_records_progress_and_losses(home):
    job_id = _submit(home, steps=4)
    assert run_worker(home, once=True) == 1
    store = JobStore(home)
    job = store.get(job_id)
    assert job.state == "succeeded", job.error
    assert (job.step, job.total_steps, job.fraction) == (4, 4, 1.0)
    assert job.outputs == {"adapter": "toy", "resumed_from": 0}
    assert job.started is not None and job.finished >= job.started
    assert store.losses(job_id) == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]


def test_a_failing_job_is_failed_with_its_one_line_reason_and_the_queue_goes_on(home):
    bad = _submit(home, "bad", steps=3, fail_at=2)
    good = _submit(home, "good", steps=2)
    assert run_worker(home, once=True) == 2
    store = JobStore(home)
    assert (store.get(bad).state, store.get(bad).error) == ("failed", "fake failure at step 2")
    assert store.get(good).state == "succeeded"


def test_cancel_a_queued_job_and_a_running_one(capsys, home):
    queued = _submit(home, "queued")
    code, out, _ = _cli(capsys, home, "cancel", str(queued))
    assert code == 0 and "cancelled job" in out
    assert JobStore(home).get(queued).state == "cancelled"

    running = _submit(home, "running", steps=10, cancel_at=3)
    run_worker(home, once=True)
    job = JobStore(home).get(running)
    assert job.state == "cancelled"
    assert job.step == 4  # the step under way when the user cancelled finished, then it stopped

    code, _, err = _cli(capsys, home, "cancel", str(running))
    assert code == 2 and err == f"error: expected a queued or running job, found job {running} cancelled\n"
    code, _, err = _cli(capsys, home, "show", "999")
    assert code == 2 and "expected a job with id 999" in err


def test_resume_queues_a_cancelled_job_again_and_it_continues_from_its_checkpoint(capsys, home):
    job_id = _submit(home, steps=6, every=2, cancel_at=4)
    run_worker(home, once=True)
    assert JobStore(home).get(job_id).state == "cancelled"
    code, out, _ = _cli(capsys, home, "resume", str(job_id))
    assert code == 0 and "queued job" in out
    run_worker(home, once=True)
    job = JobStore(home).get(job_id)
    assert job.state == "succeeded"
    assert job.outputs["resumed_from"] == 4


def test_a_job_left_running_by_a_dead_worker_is_resumed_from_its_last_checkpoint(home):
    import torch

    from trainers.core.checkpoint import save_checkpoint

    store = JobStore(home)
    job_id = _submit(home, steps=6, every=2)
    claimed = store.claim(worker_pid=2**22 + 12345)  # a worker that died: no one holds the worker lock
    store.record(job_id, 3, 6, loss=1 / 3)
    save_checkpoint(claimed.run_dir, 2, {"weights": {"w": torch.zeros(2)}})

    [recovered] = store.recover()
    assert recovered.state == "interrupted" and "stopped at step 3 of 6" in recovered.message
    run_worker(home, once=True)
    job = store.get(job_id)
    assert job.state == "succeeded"
    assert job.outputs["resumed_from"] == 2
    assert [step for step, _ in store.losses(job_id)] == [3, 4, 5, 6]


def test_a_job_that_keeps_killing_its_worker_is_failed_with_the_reason(home):
    store = JobStore(home)
    job_id = _submit(home)
    for _ in range(MAX_ATTEMPTS):
        store.claim(worker_pid=2**22 + 1)
        store.recover()
    job = store.get(job_id)
    assert job.state == "failed"
    assert "not retrying" in job.error and "stopped at step 0" in job.error


def test_only_one_worker_serves_a_home(home):
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=run_worker, args=(home,), kwargs={"poll_s": 0.05, "stop": stop})
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not worker_running(home) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker_running(home)
        with pytest.raises(AlreadyExistsError, match="already running"):
            run_worker(home, once=True)
        job_id = _submit(home, steps=2)
        while JobStore(home).get(job_id).state != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert JobStore(home).get(job_id).state == "succeeded"
    finally:
        stop.set()
        thread.join(10)
    assert not worker_running(home)


def test_unknown_ids_and_methods_are_one_line_errors(capsys, home):
    code, _, err = _cli(capsys, home, "show", "seven")
    assert code == 2 and err.startswith("error: expected a job id") and err.count("\n") == 1
    with pytest.raises(NotFoundError):
        JobStore(home).get(1)
    code = main(["--home", str(home.root), "train", "textual-inversion", "--name", "me", "--queue"])
    assert code == 2
    assert (
        capsys.readouterr().err
        == "error: expected a folder of training images for a textual-inversion run, found none\n"
    )


def test_studio_train_queue_stores_the_effective_config_and_trains_nothing(capsys, home, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    argv = ["train", "textual-inversion", "--images", str(images), "--name", "toy", "--token", "<toy>"]
    code = main(["--home", str(home.root), *argv, "--init-word", "toy", "--set", "steps=7", "--queue"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("queued job 1: textual-inversion 'toy'")
    job = JobStore(home).get(1)
    assert job.state == "queued" and job.config["images"] == str(images.resolve())
    assert job.config["config"]["placeholder_token"] == "<toy>" and job.config["config"]["steps"] == 7
    argv[argv.index("toy")] = "other"
    code = main(["--home", str(home.root), *argv, "--init-word", "toy", "--set", "stepz=7", "--queue"])
    assert code == 2 and "stepz" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "flags", "recipe"),
    [
        ("textual-inversion", ["--token", "<toy>", "--init-word", "toy"], {"num_vectors": 4, "lr": 5e-3, "steps": 300}),
        ("dreambooth", ["--token", "sks", "--class-noun", "toy"], {"rank": 8, "lr": 1e-3, "steps": 300}),
    ],
)
def test_training_on_tiny_takes_its_measured_recipe_and_a_set_key_wins(capsys, home, tmp_path, method, flags, recipe):
    """The field defaults are SD1.x recipes, which learn nothing on the embedded model in their time."""
    images = tmp_path / "photos"
    images.mkdir()
    argv = ["--home", str(home.root), "train", method, "--images", str(images), *flags, "--queue"]
    assert main([*argv, "--name", "a"]) == 0
    assert main([*argv, "--name", "b", "--set", "steps=7"]) == 0
    assert main([*argv, "--name", "c", "--base", "some/sd15"]) == 0
    on_tiny, typed, elsewhere = (JobStore(home).get(i).config["config"] for i in (1, 2, 3))
    assert {key: on_tiny[key] for key in recipe} == recipe
    assert typed["steps"] == 7 and all(typed[key] == on_tiny[key] for key in recipe if key != "steps")
    assert all(elsewhere[key] != value for key, value in recipe.items())


def _worker_process(home: StudioHome, log: Path) -> subprocess.Popen:
    # A real worker process that knows the fake method: this test module registers it on import.
    code = (
        f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]; import test_jobs; "
        "from studio.jobs import main; raise SystemExit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, "work", "--home", str(home.root), "--poll", "0.1"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_sigkill_mid_job_then_a_new_worker_resumes_and_finishes_it(home, tmp_path):
    # Generous deadlines: a fresh process imports torch, which takes minutes on a loaded machine.
    log = tmp_path / "worker.log"
    job_id = _submit(home, steps=12, every=2, delay=0.15)
    store = JobStore(home)
    worker = _worker_process(home, log)
    try:
        deadline = time.monotonic() + 600
        while store.get(job_id).step < 5 and time.monotonic() < deadline:
            assert worker.poll() is None, log.read_text()
            time.sleep(0.05)
        assert store.get(job_id).state == "running"
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
    killed_at = store.get(job_id).step
    assert store.get(job_id).state == "running"  # nobody could record the death
    assert not worker_running(home)

    worker = _worker_process(home, log)
    try:
        deadline = time.monotonic() + 600
        while store.get(job_id).state not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    job = store.get(job_id)
    assert job.state == "succeeded", (job.error, log.read_text())
    assert 2 <= job.outputs["resumed_from"] <= killed_at
    assert job.attempts == 2
    assert [step for step, _ in store.losses(job_id)] == list(range(1, 13))

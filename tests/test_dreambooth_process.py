"""DreamBooth as users run it, in separate processes: killed with SIGKILL and resumed; two DDP processes (gloo).

Both start Python processes (seconds of imports each), so they are marked slow: ``pytest -m slow``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.home import StudioHome
from studio.library import AdapterLibrary
from studio.world.concepts import SHIPPED_CONCEPTS, write_reference_folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return env


@pytest.fixture(scope="module")
def base_folder(tiny_sd1_pipe, tmp_path_factory) -> Path:
    """The tiny random SD1 fixture saved as a diffusers folder (what `--base` takes)."""
    folder = tmp_path_factory.mktemp("base") / "tiny-random"
    tiny_sd1_pipe.save_pretrained(str(folder))
    return folder


def _train_command(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "studio.cli", "train", "dreambooth", "--home", str(home), *args]


def test_sigkill_then_resume_finishes_with_an_adapter(base_folder, tmp_path):
    home = tmp_path / "home"
    images = tmp_path / "images"
    write_reference_folder(SHIPPED_CONCEPTS["robot-toy"], images, count=2)
    fresh = _train_command(
        home, "--images", str(images), "--name", "killed", "--base", str(base_folder), "--class-noun", "toy",
        "--set", "steps=400", "--set", "checkpoint_every=3", "--set", "lr=1e-3",
    )  # fmt: skip
    run_dir = home / "runs" / "dreambooth-killed"
    log = tmp_path / "first-run.log"
    with log.open("wb") as stderr:  # a file, not a pipe: an unread pipe would block the progress bar
        process = subprocess.Popen(fresh, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 600
        while not list(run_dir.glob("checkpoint-*/COMPLETE")):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert AdapterLibrary(StudioHome(home)).list() == []
    # What a kill in the middle of a save leaves behind: never picked up.
    (run_dir / ".checkpoint-999.tmp").mkdir(exist_ok=True)
    (run_dir / "checkpoint-998").mkdir(exist_ok=True)

    resumed = subprocess.run(
        [*_train_command(home, "--resume", str(run_dir), "--set", "steps=8", "-v")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "checkpoint-998" not in resumed.stderr.split("resuming from")[1][:80]
    infos = AdapterLibrary(StudioHome(home)).list()
    assert [info.name for info in infos] == ["killed"]
    assert "trained adapter 'killed'" in resumed.stdout


def test_two_processes_give_the_result_of_one_with_the_same_batch(base_folder, tmp_path):
    images = tmp_path / "images"
    write_reference_folder(SHIPPED_CONCEPTS["robot-toy"], images, count=4)
    settings = ["steps=3", "batch_size=2", "lr=1e-2", "checkpoint_every=0"]
    common = ["--images", str(images), "--base", str(base_folder), "--class-noun", "toy"]
    common += [arg for setting in settings for arg in ("--set", setting)]
    one = subprocess.run(
        _train_command(tmp_path / "one", "--name", "one", *common), env=_env(), capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr
    # accelerate's multi-process launcher (torch.distributed.run); ACCELERATE_USE_CPU picks DDP over gloo on CPUs.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29517", "-m", "studio.cli", "train", "dreambooth",
              "--home", str(tmp_path / "two"), "--name", "two", *common]  # fmt: skip
    two = subprocess.run(launch, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    single = AdapterLibrary(StudioHome(tmp_path / "one")).load("one")
    double = AdapterLibrary(StudioHome(tmp_path / "two")).load("two")
    assert double.metadata.extra["ss_batch_size_per_device"] == "1"
    moved = worst = 0.0
    for key, value in single.tensors.items():
        # DDP averages gradients in another order than one batch does: equal up to float rounding, which Adam
        # amplifies a little over the steps.
        gap = float((double.tensors[key] - value).abs().max())
        worst = max(worst, gap)
        if key.endswith("lora_up.weight"):
            moved = max(moved, float(value.abs().max()))
    assert moved > 1e-3, "the LoRA should have trained"
    assert worst < 1e-4, f"largest difference {worst:.2e}"  # seen: about 1.1e-05 on weights of about 3e-02

"""Checkpoints a user can resume from: full state, atomic, pruned only after a newer one is complete, kill-safe."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.errors import CorruptFileError, UnsafeFileError
from trainers.core.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from trainers.core.optim import make_lr_scheduler, make_optimizer

REPO = Path(__file__).resolve().parents[1]


def _setup(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = make_optimizer(model.parameters(), "adamw", lr=1e-2)
    scheduler = make_lr_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=10)
    return model, optimizer, scheduler


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(5, 4)  # draws from the global RNG, which a resume must restore
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object) -> dict:
    return {
        "weights": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "config": {"rank": 4, "lr": 0.01, "sample_prompts": ["a photo of sks"]},
    }


def test_resume_continues_exactly(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, 3)
    path = save_checkpoint(tmp_path, 3, _state(model, optimizer, scheduler))
    assert path.name == "checkpoint-3" and (path / "COMPLETE").is_file()
    _train(model, optimizer, scheduler, 3)
    expected = model.weight.detach().clone()
    expected_lr = scheduler.get_last_lr()

    # A fresh process would rebuild everything, then load the newest complete checkpoint.
    torch.manual_seed(123)
    model2, optimizer2, scheduler2 = _setup(seed=99)
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 3 and state["config"]["rank"] == 4
    model2.load_state_dict(state["weights"])
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["lr_scheduler"])
    restore_rng(state)
    _train(model2, optimizer2, scheduler2, 3)
    assert torch.equal(model2.weight, expected)
    assert scheduler2.get_last_lr() == expected_lr


def test_rng_states_round_trip(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"weights": {}})
    draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    restore_rng(load_checkpoint(tmp_path / "checkpoint-1"))
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == draws


def test_keep_prunes_older_only_after_newer_is_complete(tmp_path: Path) -> None:
    weights = {"w": torch.ones(2)}
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"weights": weights}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]
    save_checkpoint(tmp_path, 40, {"weights": weights})  # keep=1 by default
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-40"]
    # Saving the same step again replaces it.
    save_checkpoint(tmp_path, 40, {"weights": {"w": torch.zeros(2)}})
    assert torch.equal(load_checkpoint(tmp_path / "checkpoint-40")["weights"]["w"], torch.zeros(2))


def test_incomplete_and_temporary_folders_are_never_picked(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, {"weights": {"w": torch.ones(1)}})
    # What a kill leaves behind: a half-written temp folder, and (from another tool) a folder without COMPLETE.
    (tmp_path / ".checkpoint-9.tmp").mkdir()
    (tmp_path / ".checkpoint-9.tmp" / "weights.safetensors").write_bytes(b"partial")
    (tmp_path / "checkpoint-99").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-5"
    # A damaged payload behind a COMPLETE marker is noticed through the recorded sizes.
    damaged = save_checkpoint(tmp_path, 50, {"weights": {"w": torch.ones(1000)}}, keep=5)
    with (damaged / "weights.safetensors").open("r+b") as handle:
        handle.truncate(100)
    assert latest_checkpoint(tmp_path).name == "checkpoint-5"
    with pytest.raises(CorruptFileError, match="incomplete"):
        load_checkpoint(tmp_path / "checkpoint-99")
    # The next save cleans the leftovers.
    save_checkpoint(tmp_path, 6, {"weights": {"w": torch.ones(1)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_state_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"weights": {}})
    torch.save({"step": 1, "evil": Path("x")}, path / "state.pt")  # Path needs a non-allowed global to unpickle
    complete = path / "COMPLETE"
    listing = json.loads(complete.read_text())
    listing["files"]["state.pt"] = (path / "state.pt").stat().st_size
    complete.write_text(json.dumps(listing))
    with pytest.raises(UnsafeFileError, match="more than tensors"):
        load_checkpoint(path)


def test_sigkill_during_saves_never_leaves_a_bad_latest(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, torch
        from trainers.core.checkpoint import save_checkpoint
        run = sys.argv[1]
        weights = {"w": torch.randn(512, 1024)}  # 2 MB: saves take long enough to be interrupted
        step = 0
        while True:
            step += 1
            weights["w"].fill_(step)
            save_checkpoint(run, step, {"weights": weights, "config": {"step": step}}, keep=2)
            print(step, flush=True)
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    rng = random.Random(0)
    for attempt in range(1):  # each attempt costs a process start (importing torch): one is enough per run
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True
        )
        try:
            assert proc.stdout is not None
            proc.stdout.readline()  # at least one save finished in this process
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        latest = latest_checkpoint(tmp_path)
        assert latest is not None, f"attempt {attempt}: no complete checkpoint after a kill"
        state = load_checkpoint(latest)
        assert torch.all(state["weights"]["w"] == state["config"]["step"])


def test_objects_that_would_not_load_back_are_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state\['optimizer'\]\['extra'\] is a float64"):
        save_checkpoint(tmp_path, 1, {"weights": {}, "optimizer": {"extra": np.float64(1.0)}})
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 2, {"weights": {}, "noise_generator": torch.Generator().manual_seed(0).get_state()})
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"


def test_a_kill_while_replacing_the_same_step_keeps_the_old_copy(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 7, {"weights": {"w": torch.ones(1)}})
    (tmp_path / "checkpoint-7").rename(tmp_path / ".checkpoint-7.old")  # killed right after moving it aside
    (tmp_path / ".checkpoint-7.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-7"
    assert torch.equal(load_checkpoint(tmp_path / "checkpoint-7")["weights"]["w"], torch.ones(1))

"""Crash-safe training checkpoints: full state written atomically, old ones pruned only after a newer one is complete.

Layout of ``run_dir/checkpoint-<step>/``:

- ``weights.safetensors``: the trained tensors (``state["weights"]``), with metadata in the header;
- ``state.pt``: everything else (optimizer, LR scheduler, RNG states, step, config) written with `torch.save`, read
  back with ``weights_only=True``, so it may hold only tensors and plain containers;
- ``config.json``: the config, for people;
- ``COMPLETE``: written last; lists every file with its size.

A checkpoint is built in ``.checkpoint-<step>.tmp``, each file fsynced, then renamed into place, so a SIGKILL at any
moment leaves either the previous checkpoints or a complete new one; leftovers are ignored and cleaned on the next
save::

    save_checkpoint(run_dir, step, {"weights": lora_state, "optimizer": opt.state_dict(),
                                    "lr_scheduler": sched.state_dict(), "config": config_to_dict(cfg)})
    path = latest_checkpoint(run_dir)
    if path is not None:
        state = load_checkpoint(path)
        restore_rng(state)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from studio.adapter_files import fsync_dir
from studio.errors import CorruptFileError, InvalidInputError, UnsafeFileError
from trainers.core.config import config_to_dict

__all__ = [
    "capture_rng",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
COMPLETE_FILE = "COMPLETE"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^\.checkpoint-(\d+)\.(tmp|old)$")


# --- RNG ----------------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """The RNG states of python ``random``, numpy, torch and (when initialised) CUDA, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        # numpy arrays are not allowed by weights_only loading: store the key as an int64 tensor.
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore what `capture_rng` captured; accepts the RNG dict or a whole loaded checkpoint (its ``"rng"``)."""
    rng = state.get("rng", state)
    python = rng["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss"]))
    np_state = rng["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        cuda_states = rng["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "not restoring CUDA RNG: checkpoint has %d device states, this machine %d",
                len(cuda_states),
                torch.cuda.device_count(),
            )


# --- saving -------------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _string_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    state: Mapping[str, Any],
    *,
    keep: int = 1,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically and return its path; then prune all but the newest ``keep``.

    ``state["weights"]`` (a dict of tensors) goes to safetensors; the other entries (optimizer and LR scheduler
    state dicts, ``config`` as from `config_to_dict`, generator states, ...) to ``state.pt``, with ``step`` and the
    RNG states (`capture_rng`) added unless given. ``metadata`` is written into the safetensors header.
    """
    if keep < 1:
        raise InvalidInputError(f"config key 'keep_checkpoints' expects a positive int, got '{keep}'")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"

    # 1. Everything but the weights goes through torch.save and must load back with weights_only=True. Check it now:
    #    an object that only fails at resume time would make every checkpoint of the run useless.
    rest = {k: v for k, v in state.items() if k != "weights"}
    if dataclasses.is_dataclass(rest.get("config")) and not isinstance(rest["config"], type):
        rest["config"] = config_to_dict(rest["config"])
    rest.setdefault("step", step)
    rest.setdefault("rng", capture_rng())
    _check_plain(rest, "state")

    # 2. Clear leftovers of an interrupted save (any step): they are never complete.
    _remove_leftovers(run_dir)
    tmp.mkdir()

    # 3. Trained weights as safetensors (contiguous CPU copies; safetensors refuses shared or strided storage).
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in dict(state.get("weights", {})).items()}
    header = {"studio.checkpoint_step": str(step), **_string_metadata(metadata)}
    save_file(weights, str(tmp / WEIGHTS_FILE), metadata=header)

    # 4. The rest of the state, and the config as JSON for people.
    torch.save(rest, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(rest.get("config", {}), indent=2, sort_keys=True, default=str))

    # 5. fsync the payload, then write COMPLETE last (with sizes so a damaged file is noticed), fsync, rename.
    files = {}
    for name in (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE):
        _fsync_file(tmp / name)
        files[name] = (tmp / name).stat().st_size
    (tmp / COMPLETE_FILE).write_text(json.dumps({"step": step, "files": files}))
    _fsync_file(tmp / COMPLETE_FILE)
    fsync_dir(tmp)
    if final.exists():
        # Same step saved again (e.g. after a resume): move the old one aside first; the rename below is atomic.
        old = run_dir / f".checkpoint-{step}.old"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_dir(run_dir)

    # 6. Only now that the new checkpoint is complete, delete older ones beyond `keep`.
    _prune(run_dir, keep)
    return final


# Exact types: subclasses such as numpy.float64 (a float) pickle as their own class, which weights_only refuses.
_PLAIN_LEAVES = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError naming the first entry that ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_LEAVES:
        return
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise TypeError(f"checkpoint {where} has a key of type {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"checkpoint {where} is a {type(value).__name__}; only tensors and plain containers load with "
        "weights_only=True (convert it, e.g. numpy values with torch.as_tensor or float())"
    )


def _recover_replaced(run_dir: Path) -> None:
    # A kill between moving checkpoint-N aside (to .old) and renaming its replacement into place leaves a complete
    # .old and no checkpoint-N: put it back, it is the newest complete state.
    for path in run_dir.iterdir():
        match = _TMP_RE.match(path.name)
        if match and match.group(2) == "old" and _is_complete(path):
            final = run_dir / f"checkpoint-{match.group(1)}"
            if not final.exists():
                logger.warning("restoring %s moved aside by an interrupted save", final)
                path.rename(final)


def _remove_leftovers(run_dir: Path) -> None:
    _recover_replaced(run_dir)
    for path in run_dir.iterdir():
        if path.is_dir() and _TMP_RE.match(path.name):
            logger.info("removing %s left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)


def _prune(run_dir: Path, keep: int) -> None:
    complete = list_checkpoints(run_dir)
    for _, path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for path in run_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and not _is_complete(path):
            # Never written by save_checkpoint (which renames only complete folders): a damaged or foreign copy.
            logger.warning("removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


# --- finding and loading ------------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        return False
    try:
        listing = json.loads(marker.read_text())
        files = listing["files"]
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, path)``, oldest first; incomplete and temporary folders are skipped."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and _is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None (what ``--resume`` continues from)."""
    if Path(run_dir).is_dir():
        _recover_replaced(Path(run_dir))
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint back: ``weights`` (dict of tensors on CPU), ``step``, ``rng``, ``config`` and the rest.

    Raises `CorruptFileError` for a folder that is not a complete checkpoint.
    """
    path = Path(path)
    if not _is_complete(path):
        raise CorruptFileError(f"checkpoint {path} is incomplete (no valid {COMPLETE_FILE} marker)")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        weights = load_file(str(path / WEIGHTS_FILE))
    except pickle.UnpicklingError:
        raise UnsafeFileError(f"checkpoint {path}: {STATE_FILE} holds more than tensors and plain containers") from None
    except (OSError, RuntimeError, SafetensorError) as error:
        raise CorruptFileError(f"checkpoint {path} could not be read: {error}") from None
    if not isinstance(state, dict):
        raise CorruptFileError(f"checkpoint {path}: {STATE_FILE} holds {type(state).__name__}, expected a dict")
    state["weights"] = weights
    return state

"""Adapter files: what a user notices if reading or writing them goes wrong."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio.adapter_files import (
    AdapterFile,
    AdapterMetadata,
    load_adapter,
    read_header,
    safe_torch_load,
    save_adapter,
)
from studio.errors import CorruptFileError, InvalidInputError, NotFoundError, StudioError, UnsafeFileError


def _lora_adapter() -> AdapterFile:
    meta = AdapterMetadata(
        kind="lora",
        family="sd1",
        base_model="tiny",
        base_fingerprint="0123456789abcdef",
        placeholder_tokens=["sks"],
        config={"rank": 4, "lr": 1e-4},
        name="dog",
        extra={"ss_network_dim": "4", "modelspec.title": "dog"},
    )
    tensors = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }
    return AdapterFile(tensors, meta)


def _assert_one_line(error: StudioError) -> None:
    message = str(error)
    assert message and "\n" not in message


def test_round_trip_keeps_tensors_and_metadata(tmp_path: Path) -> None:
    adapter = _lora_adapter()
    path = save_adapter(tmp_path / "dog.safetensors", adapter)

    loaded = load_adapter(path)
    assert loaded.metadata == adapter.metadata
    assert loaded.tensors.keys() == adapter.tensors.keys()
    for key, tensor in adapter.tensors.items():
        assert torch.equal(loaded.tensors[key], tensor)
    header = read_header(path)
    assert header["studio.kind"] == "lora"
    assert json.loads(header["studio.placeholder_tokens"]) == ["sks"]
    assert header["ss_network_dim"] == "4"  # foreign keys kept verbatim
    assert header["studio.created"].endswith("Z")


def test_save_writes_views_and_non_contiguous_tensors(tmp_path: Path) -> None:
    weight = torch.randn(8, 4)
    adapter = AdapterFile(
        {"emb_params": weight.t(), "other": weight[:2]},  # a transposed view and a view sharing storage
        AdapterMetadata(kind="textual_inversion", family="sd1"),
    )
    loaded = load_adapter(save_adapter(tmp_path / "a.safetensors", adapter))
    assert torch.equal(loaded.tensors["emb_params"], weight.t())


def test_failed_write_leaves_no_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tmp_path / "dog.safetensors", _lora_adapter())
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_adapter(tmp_path / "dog.safetensors", _lora_adapter())
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("io error")))
    with pytest.raises(OSError):
        save_adapter(path, _lora_adapter())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dog.safetensors"]


def test_save_without_overwrite_refuses_existing_name(tmp_path: Path) -> None:
    path = save_adapter(tmp_path / "dog.safetensors", _lora_adapter())
    with pytest.raises(FileExistsError):
        save_adapter(path, _lora_adapter(), overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["dog.safetensors"]


def test_saving_nan_weights_is_refused(tmp_path: Path) -> None:
    adapter = AdapterFile(
        {"emb_params": torch.tensor([[float("nan"), 1.0]])}, AdapterMetadata("textual_inversion", "sd1")
    )
    with pytest.raises(CorruptFileError, match="emb_params"):
        save_adapter(tmp_path / "a.safetensors", adapter)
    assert list(tmp_path.iterdir()) == []


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="kind"):
        AdapterMetadata(kind="hypernetwork", family="sd1")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load_adapter(tmp_path / "nope.safetensors")


# --- corrupt files ------------------------------------------------------------------------------------------------


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = save_adapter(tmp_path / "dog.safetensors", _lora_adapter())
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 40])
    with pytest.raises(CorruptFileError, match="truncated") as info:
        load_adapter(cut)
    _assert_one_line(info.value)

    cut.write_bytes(data[:30])  # cut inside the JSON header
    with pytest.raises(CorruptFileError, match="truncated"):
        load_adapter(cut)


def test_header_lying_about_offsets_is_refused(tmp_path: Path) -> None:
    data = torch.zeros(4, dtype=torch.float32).numpy().tobytes()
    wrong_size = _write_raw(
        tmp_path / "a.safetensors", {"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, data
    )
    with pytest.raises(CorruptFileError, match=r"header says tensor 'w' is F32 \[8\] \(32 bytes\) but") as info:
        load_adapter(wrong_size)
    _assert_one_line(info.value)

    overlap = _write_raw(
        tmp_path / "b.safetensors",
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        },
        data,
    )
    with pytest.raises(CorruptFileError, match="header says tensor 'b' starts at byte 8 but"):
        load_adapter(overlap)

    beyond = _write_raw(
        tmp_path / "c.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, data
    )
    with pytest.raises(CorruptFileError, match="header says tensor 'w' ends at byte 32"):
        read_header(beyond)


def test_nan_and_inf_weights_are_refused(tmp_path: Path) -> None:
    for bad in (float("nan"), float("inf")):
        path = tmp_path / "bad.safetensors"
        save_file({"lora.alpha": torch.tensor(1.0), "emb_params": torch.tensor([[1.0, bad]])}, path)
        with pytest.raises(CorruptFileError, match="'emb_params' holds") as info:
            load_adapter(path)
        _assert_one_line(info.value)


def test_files_that_are_not_safetensors(tmp_path: Path) -> None:
    png = tmp_path / "photo.safetensors"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CorruptFileError, match="PNG"):
        load_adapter(png)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not an adapter\n")
    with pytest.raises(CorruptFileError, match="not a safetensors file"):
        load_adapter(text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="not a safetensors file"):
        load_adapter(empty)


def test_foreign_safetensors_is_not_a_studio_adapter(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, path)
    with pytest.raises(InvalidInputError, match="not a studio adapter file"):
        load_adapter(path)


# --- pickles -------------------------------------------------------------------------------------------------------


class _Payload:
    """A pickle payload that creates a marker file when unpickled without protection."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "embedding.pt"
    torch.save({"string_to_param": {"*": _Payload(marker)}, "name": "x"}, path)
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
    modern = tmp_path / "modern.ckpt"
    modern.write_bytes(pickle.dumps({"x": _Payload(marker)}))

    for file in (path, legacy, modern):
        with pytest.raises(UnsafeFileError, match="needs more than tensors and plain containers") as info:
            safe_torch_load(file)
        _assert_one_line(info.value)
        assert not marker.exists()

    # The payload is real: an unprotected load runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_plain_pickle_loads(tmp_path: Path) -> None:
    path = tmp_path / "embedding.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(1, 4)}, "name": "cat"}, path)
    loaded = safe_torch_load(path)
    assert loaded["name"] == "cat"
    assert torch.equal(loaded["string_to_param"]["*"], torch.ones(1, 4))


def test_garbage_pt_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_text("not a pickle")
    with pytest.raises(CorruptFileError, match="not a torch file") as info:
        safe_torch_load(path)
    _assert_one_line(info.value)

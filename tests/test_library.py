"""The adapter library: what a user of `studio adapters ...` sees, and that bad input never lands in the library."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.adapter_files import AdapterFile, AdapterMetadata, save_adapter
from studio.base_models import BaseModel
from studio.errors import (
    AlreadyExistsError,
    CorruptFileError,
    FamilyMismatchError,
    InvalidInputError,
    NotFoundError,
    StudioError,
    UnsafeFileError,
)
from studio.families import SD1, SDXL
from studio.library import AdapterLibrary, name_from_file, sanitize_name
from studio.testing import build_tiny_sd1_pipeline, build_tiny_sdxl_pipeline
from tests.test_formats import make_lora, render


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return BaseModel.from_pipeline(build_tiny_sd1_pipeline(seed=0), "tiny")


@pytest.fixture
def library(home) -> AdapterLibrary:
    return AdapterLibrary(home)


def _embedding(width: int = 32, token: str = "<cat>") -> AdapterFile:
    meta = AdapterMetadata(kind="textual_inversion", family="sd1", placeholder_tokens=[token], config={"steps": 10})
    return AdapterFile({"emb_params": torch.randn(2, width)}, meta)


def _library_files(library: AdapterLibrary) -> list[str]:
    """Every file under the library folder, temporary ones included."""
    if not library.folder.exists():
        return []
    return sorted(p.name for p in library.folder.rglob("*"))


# --- names --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x" * 101, "a..b", "sp ace", "c:\\x", "é"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="adapter name"):
        sanitize_name(name)


def test_safe_names_and_names_from_files() -> None:
    assert sanitize_name("My_dog-2.v1") == "My_dog-2.v1"
    assert name_from_file(Path("My Style (v2).safetensors")) == "My-Style-v2"
    assert name_from_file(Path("..hidden.pt")) == "hidden"
    assert name_from_file(Path("日本.pt")) == "adapter"


# --- add / list / show / load / remove ----------------------------------------------------------------------------


def test_empty_library_lists_nothing(library: AdapterLibrary) -> None:
    assert library.list() == []
    assert not library.folder.exists()  # listing creates nothing


def test_add_list_show_load_remove(library: AdapterLibrary) -> None:
    adapter = _embedding()
    info = library.add(adapter, "cat")
    assert (info.name, info.kind, info.family, info.placeholder_tokens) == (
        "cat",
        "textual_inversion",
        "sd1",
        ["<cat>"],
    )
    assert info.size_bytes == Path(info.path).stat().st_size
    assert Path(info.path) == library.path("cat")

    listed = library.list()
    assert [i.name for i in listed] == ["cat"]
    json.dumps([i.to_dict() for i in listed])  # `--json` output must serialise
    assert library.show("cat").metadata["studio.kind"] == "textual_inversion"

    loaded = library.load("cat")
    assert torch.equal(loaded.tensors["emb_params"], adapter.tensors["emb_params"])
    assert loaded.metadata.name == "cat"
    assert loaded.metadata.config == {"steps": 10}

    library.remove("cat")
    assert library.list() == []
    with pytest.raises(NotFoundError, match="no adapter named 'cat'"):
        library.show("cat")
    with pytest.raises(NotFoundError):
        library.remove("cat")


def test_existing_name_is_an_error_not_an_overwrite(library: AdapterLibrary, tmp_path: Path) -> None:
    library.add(_embedding(), "cat")
    before = library.path("cat").read_bytes()
    with pytest.raises(AlreadyExistsError) as info:
        library.add(_embedding(), "cat")
    assert str(info.value) == "an adapter named 'cat' already exists; choose another --name or remove it first"

    source = tmp_path / "cat.safetensors"
    save_file({"emb_params": torch.randn(1, 32)}, source)
    with pytest.raises(AlreadyExistsError):
        library.import_file(source)  # the name defaults to the file's
    assert library.path("cat").read_bytes() == before
    assert _library_files(library) == ["cat.safetensors"]


def test_corrupt_file_in_library_is_skipped_by_list(library: AdapterLibrary) -> None:
    library.add(_embedding(), "good")
    (library.folder / "broken.safetensors").write_bytes(b"\x00" * 20)
    assert [i.name for i in library.list()] == ["good"]


# --- import: the bad inputs of issue 2 ----------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _bad_files(tmp_path: Path) -> list[tuple[Path, type[StudioError], str]]:
    files: list[tuple[Path, type[StudioError], str]] = []

    pickle_file = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": _Payload(tmp_path / "pwned")}, "name": "evil"}, pickle_file)
    files.append((pickle_file, UnsafeFileError, "needs more than tensors"))

    good = tmp_path / "good.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-16])
    files.append((truncated, CorruptFileError, "truncated"))

    lying = tmp_path / "lying.safetensors"
    raw = json.dumps({"emb_params": {"dtype": "F32", "shape": [2, 32], "data_offsets": [0, 64]}}).encode()
    lying.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    files.append((lying, CorruptFileError, "header says tensor 'emb_params' is F32"))

    nan = tmp_path / "nan.safetensors"
    save_file({"emb_params": torch.full((1, 32), float("nan"))}, nan)
    files.append((nan, CorruptFileError, "NaN"))

    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    files.append((png, InvalidInputError, "PNG"))
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    files.append((text, InvalidInputError, "not an adapter"))
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"a.weight": torch.randn(3, 3, 3), "b.bias": torch.randn(3)}, unrelated)
    files.append((unrelated, InvalidInputError, "not an adapter"))
    return files


def test_bad_files_are_refused_and_nothing_is_written(library: AdapterLibrary, base: BaseModel, tmp_path: Path) -> None:
    for path, error, message in _bad_files(tmp_path):
        with pytest.raises(error, match=message) as info:
            library.import_file(path, base=base)
        assert "\n" not in str(info.value), path.name
        assert _library_files(library) == [], path.name
    assert not (tmp_path / "pwned").exists(), "the pickle's code must never run"


def test_sdxl_adapters_are_refused_for_an_sd1_base(library: AdapterLibrary, base: BaseModel, tmp_path: Path) -> None:
    xl_lora = save_adapter(tmp_path / "xl.safetensors", make_lora(build_tiny_sdxl_pipeline(seed=0), SDXL, rank=2))
    xl_embedding = tmp_path / "xl-style.safetensors"
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 32)}, xl_embedding)
    kohya_xl = tmp_path / "kohya-xl.safetensors"
    save_file(
        {
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2),
        },
        kohya_xl,
    )
    for path in (xl_lora, xl_embedding, kohya_xl):
        with pytest.raises(FamilyMismatchError) as info:
            library.import_file(path, base=base)
        assert str(info.value) == f"{path.name} is an SDXL adapter but the base model 'tiny' is SD1.x"
    assert _library_files(library) == []


def test_shape_mismatches_are_refused(library: AdapterLibrary, base: BaseModel, tmp_path: Path) -> None:
    real_sd15 = tmp_path / "real.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 768), f"{key}.lora_up.weight": torch.randn(32, 4)}, real_sd15)
    with pytest.raises(
        InvalidInputError, match=r"makes a \[32, 768\] update but the base model 'tiny' has a \[32, 32\]"
    ):
        library.import_file(real_sd15, base=base)

    missing = tmp_path / "missing.safetensors"
    key = "lora_unet_down_blocks_3_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 32), f"{key}.lora_up.weight": torch.randn(32, 4)}, missing)
    with pytest.raises(InvalidInputError, match="does not have"):
        library.import_file(missing, base=base)

    wide = tmp_path / "wide.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}}, wide)  # a real SD1.5 embedding on the tiny model
    with pytest.raises(InvalidInputError, match="768 wide but the base model 'tiny' expects 32"):
        library.import_file(wide, base=base)
    assert _library_files(library) == []


# --- import: foreign formats --------------------------------------------------------------------------------------


def test_each_foreign_format_imports(library: AdapterLibrary, base: BaseModel, tmp_path: Path) -> None:
    from studio.formats import export_adapter

    lora = make_lora(base.pipeline, SD1, rank=2)
    embedding = AdapterFile(
        {"emb_params": torch.randn(2, 32)},
        AdapterMetadata(kind="textual_inversion", family="sd1", placeholder_tokens=["<cat>"], name="cat"),
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (kohya,) = export_adapter(lora, "kohya", foreign / "kohya.safetensors")
    (peft,) = export_adapter(lora, "diffusers", foreign / "peft.safetensors")
    (a1111_pt,) = export_adapter(embedding, "a1111", foreign / "a1111-style.pt")
    (a1111,) = export_adapter(embedding, "a1111", foreign / "a1111.safetensors")
    diffusers_bin = foreign / "learned_embeds.bin"
    torch.save({"<dog>": torch.randn(32)}, diffusers_bin)

    expected = {
        kohya: ("lora", ["sks"]),
        peft: ("lora", ["sks"]),
        a1111_pt: ("textual_inversion", ["a1111-style"]),  # A1111 prompts use the file name
        a1111: ("textual_inversion", ["<cat>"]),  # our own header came along
        diffusers_bin: ("textual_inversion", ["<dog>"]),
    }
    for path, (kind, tokens) in expected.items():
        info = library.import_file(path, name=f"imported-{path.stem}", base=base)
        assert (info.kind, info.family, info.placeholder_tokens) == (kind, "sd1", tokens), path.name
        assert library.load(info.name).metadata.kind == kind
    assert len(library.list()) == len(expected)


# --- export -------------------------------------------------------------------------------------------------------


def test_kohya_export_loads_in_diffusers_like_the_library_file(library: AdapterLibrary, tmp_path: Path) -> None:
    adapter = make_lora(build_tiny_sd1_pipeline(seed=0), SD1, rank=4, alpha=2.0)
    library.add(adapter, "dog")
    (exported,) = library.export("dog", "kohya", tmp_path)
    assert exported == tmp_path / "dog.safetensors"

    images = []
    for path in (exported, library.path("dog")):
        pipe = build_tiny_sd1_pipeline(seed=0)
        pipe.load_lora_weights(str(path), adapter_name="dog")
        images.append(render(pipe))
    plain = render(build_tiny_sd1_pipeline(seed=0))
    assert np.abs(images[0] - plain).max() > 1e-3, "the LoRA should change the image"
    np.testing.assert_array_equal(images[0], images[1])


def test_embedding_export_loads_with_load_textual_inversion(library: AdapterLibrary, tmp_path: Path) -> None:
    library.add(_embedding(token="<cat>"), "cat")
    (path,) = library.export("cat", "a1111", tmp_path / "cat.pt")
    pipe = build_tiny_sd1_pipeline(seed=0)
    pipe.load_textual_inversion(str(path), token="<cat>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<cat>", "<cat>_1"])
    torch.testing.assert_close(
        pipe.text_encoder.get_input_embeddings().weight[ids].detach(), library.load("cat").tensors["emb_params"]
    )

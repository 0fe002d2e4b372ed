"""DreamBooth trainer on tiny random models: config, LoRA output that loads everywhere, resume, bad input, SDXL."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import AdapterRef, GenerationRequest, PipelineService
from studio.base_models import BaseModel
from studio.errors import AlreadyExistsError, InvalidInputError, StudioError
from studio.library import AdapterLibrary
from studio.world.concepts import SHIPPED_CONCEPTS, write_reference_folder
from trainers.core.config import load_config
from trainers.core.progress import LossHistory
from trainers.dreambooth import DreamBoothConfig, instance_caption, train_dreambooth, train_from_cli

FAST = ["steps=3", "lr=5e-2", "checkpoint_every=0", "class_image_steps=2", "sample_steps=2"]


def _config(*overrides: str) -> DreamBoothConfig:
    return load_config(DreamBoothConfig, values={"class_noun": "toy"}, overrides=[*FAST, *overrides])


def _base(pipe) -> BaseModel:
    return BaseModel.from_pipeline(copy.deepcopy(pipe), "tiny-random")


def _images(folder: Path, count: int = 3) -> Path:
    write_reference_folder(SHIPPED_CONCEPTS["robot-toy"], folder, count=count)
    return folder


# -- config -----------------------------------------------------------------------------------------------------------


def test_config_is_strict_and_derives_defaults_in_one_place(tiny_sd1_pipe):
    with pytest.raises(InvalidInputError, match="'rnak'.*did you mean 'rank'"):
        _config("rnak=8")
    with pytest.raises(InvalidInputError, match="'rank' expects a positive int, got '0'"):
        _config("rank=0")
    with pytest.raises(InvalidInputError, match="'lr' expects a finite float"):
        _config("lr=nan")
    with pytest.raises(InvalidInputError, match="class_noun"):
        load_config(DreamBoothConfig)
    with pytest.raises(InvalidInputError, match="'single_file' applies to mode 'full' only"):
        _config("single_file=true")
    assert _config("mode=full", "single_file=true").single_file
    base = _base(tiny_sd1_pipe)
    lora = load_config(DreamBoothConfig, values={"class_noun": "dog"}, overrides=["rank=8"]).resolve(base)
    assert (lora.alpha, lora.lr, lora.resolution) == (8.0, 1e-4, 64)
    assert lora.unet_targets == ("to_q", "to_k", "to_v", "to_out.0")
    full = load_config(DreamBoothConfig, values={"class_noun": "dog", "mode": "full"}).resolve(base)
    assert full.lr == 5e-6


def test_captions_bind_the_token_to_the_class_noun():
    cfg = _config()
    assert instance_caption(cfg, "") == "a sks toy"
    assert instance_caption(cfg, "a toy on a red background") == "a sks toy on a red background"
    assert instance_caption(cfg, "sks on a table") == "sks on a table"
    assert instance_caption(cfg, "on a table") == "a sks toy, on a table"


# -- a trained LoRA ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_sd1_pipe, tmp_path_factory):
    from studio.home import StudioHome

    root = tmp_path_factory.mktemp("dreambooth")
    home = StudioHome(root / "home").ensure()
    library = AdapterLibrary(home)
    history = LossHistory()
    info = train_dreambooth(
        _config("sample_every=3", "prior_preservation=true", "num_class_images=2", "batch_size=2"),
        _images(root / "images"),
        _base(tiny_sd1_pipe),
        name="toy",
        library=library,
        run_dir=home.runs / "toy",
        progress=history,
    )
    return info, library, history, root


def test_lora_changes_the_image_and_reproduces_through_service_and_diffusers(trained, tiny_sd1_pipe):
    info, library, history, root = trained
    service = PipelineService(_base(tiny_sd1_pipe), adapter_source=library)
    request = GenerationRequest(prompt="a sks toy", seeds=[0], steps=2, guidance=7.5)
    plain = np.asarray(service.generate(request).images[0], dtype=np.int16)
    request.adapters = [AdapterRef("toy")]
    studio_image = np.asarray(service.generate(request).images[0], dtype=np.int16)
    assert np.abs(studio_image - plain).mean() > 1.0, "the trained LoRA should change the image"

    # The sample the trainer made with its live peft layers at the last step is the studio's image.
    assert [p.name for p in history.samples] == ["step000003-p0-s0.png"]
    sample = np.asarray(Image.open(history.samples[0]).convert("RGB"), dtype=np.int16)
    assert np.abs(sample - studio_image).max() <= 2

    # The exported kohya file loads in diffusers' own loader and gives the same image.
    exported = library.export("toy", "kohya", root / "toy-kohya.safetensors")[0]
    pipe = copy.deepcopy(tiny_sd1_pipe)
    pipe.load_lora_weights(str(exported))
    image = pipe(
        "a sks toy",
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="pil",
    ).images[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - studio_image).max() <= 2


def test_adapter_header_has_the_effective_config_and_kohya_card(trained):
    info, _, history, _ = trained
    meta = info.metadata
    config = json.loads(meta["studio.config"])
    assert config["rank"] == 4 and config["alpha"] == 4.0 and config["lr"] == 5e-2 and config["resolution"] == 64
    assert config["prior_preservation"] is True
    assert info.kind == "lora" and info.placeholder_tokens == ["sks", "sks toy"]
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_max_train_steps"] == "3"
    assert json.loads(meta["ss_tag_frequency"]) == {"images": {"a sks toy": 3}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert history.steps == [1, 2, 3] and all(np.isfinite(history.losses))


def test_sdxl_lora_trains_with_text_encoder(tiny_sdxl_pipe, home, tmp_path):
    library = AdapterLibrary(home.ensure())
    base = _base(tiny_sdxl_pipe)
    info = train_dreambooth(
        _config("steps=2", "train_text_encoder=true"),
        _images(tmp_path / "images", 2),
        base,
        name="xl",
        library=library,
        run_dir=home.runs / "xl",
    )
    keys = library.load("xl").tensors
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in keys)
    assert any(k.startswith("lora_te2_") for k in keys) and any(k.startswith("lora_te1_") for k in keys)
    assert info.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    # The training pipeline is the stock one again.
    assert not any("lora" in name for name, _ in base.pipeline.unet.named_modules())
    service = PipelineService(_base(tiny_sdxl_pipe), adapter_source=library)
    request = GenerationRequest(prompt="a sks toy", seeds=[0], steps=2, adapters=[AdapterRef("xl")])
    assert service.generate(request).images[0].size == (64, 64)


# -- resume -----------------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def test_resume_continues_from_the_newest_complete_checkpoint_exactly(tiny_sd1_pipe, home, tmp_path):
    library = AdapterLibrary(home.ensure())
    images = _images(tmp_path / "images", 2)
    cfg = _config("steps=4", "checkpoint_every=2")

    def stop_at_3(event):
        if event.step == 3:
            raise _Stop

    run_dir = home.runs / "r"
    with pytest.raises(_Stop):
        train_dreambooth(cfg, images, _base(tiny_sd1_pipe), name="r", library=library, run_dir=run_dir,
                         progress=stop_at_3)  # fmt: skip
    assert library.list() == []
    # A folder cut short by a kill (no COMPLETE marker) is newer but must never be picked.
    (run_dir / "checkpoint-3").mkdir()
    (run_dir / "checkpoint-3" / "weights.safetensors").write_bytes(b"partial")
    history = LossHistory()
    train_dreambooth(cfg, images, _base(tiny_sd1_pipe), name="r", library=library, run_dir=run_dir,
                     progress=history, resume=True)  # fmt: skip
    assert history.steps == [3, 4]
    train_dreambooth(cfg, images, _base(tiny_sd1_pipe), name="straight", library=library, run_dir=home.runs / "s")
    resumed, straight = library.load("r").tensors, library.load("straight").tensors
    for key, value in straight.items():
        assert torch.allclose(resumed[key], value, atol=1e-6), key
    assert not list(run_dir.glob("checkpoint-*")), "checkpoints are removed once the adapter is stored"


# -- bad input --------------------------------------------------------------------------------------------------------


def _png_bomb(path: Path) -> None:
    # A valid PNG header that claims 20000x20000 pixels; the data is never decoded.
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def _truncated_jpeg(path: Path) -> None:
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "no images found"),
        (lambda d: (d / "notes.md").write_text("hi"), "no images found"),
        (lambda d: _truncated_jpeg(d / "a.jpg"), "no usable images"),
        (lambda d: _png_bomb(d / "bomb.png"), "decompression bomb"),
    ],
    ids=["empty", "only-non-image", "truncated-jpeg", "png-bomb"],
)
def test_bad_image_folders_fail_clearly_and_leave_no_adapter(tiny_sd1_pipe, home, tmp_path, make, message):
    folder = tmp_path / "images"
    folder.mkdir()
    make(folder)
    library = AdapterLibrary(home.ensure())
    with pytest.raises(StudioError, match=message):
        train_dreambooth(_config(), folder, _base(tiny_sd1_pipe), name="bad", library=library, run_dir=home.runs / "b")
    assert library.list() == []


def test_odd_image_modes_train_and_non_images_are_skipped_with_a_warning(tiny_sd1_pipe, home, tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (70, 60), 128).save(folder / "gray.png")
    Image.new("CMYK", (64, 64), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(folder / "deep.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 100)).save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.new("RGB", (80, 64), (0, 0, 255)).save(folder / "rotated.jpg", exif=exif)
    (folder / "notes.md").write_text("not an image")
    library = AdapterLibrary(home.ensure())
    with caplog.at_level(logging.WARNING):
        info = train_dreambooth(_config("steps=1"), folder, _base(tiny_sd1_pipe), name="modes", library=library,
                                run_dir=home.runs / "m")  # fmt: skip
    assert "notes.md" in caplog.text
    assert info.metadata["ss_num_train_images"] == "5"


def _args(**kwargs) -> argparse.Namespace:
    defaults = {"images": None, "name": "cli", "base": "tiny", "config": None, "set": [], "resume": None,
                "queue": False, "token": None, "class_noun": "toy"}  # fmt: skip
    return argparse.Namespace(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["rank=0"], "'rank' expects a positive int"), (["lr=nan"], "'lr' expects a finite float"),
     (["colour=red"], "unknown config key 'colour'")],
)  # fmt: skip
def test_cli_refuses_bad_config_before_training(home, tmp_path, overrides, message):
    images = _images(tmp_path / "images", 1)
    with pytest.raises(InvalidInputError, match=message):
        train_from_cli(_args(images=str(images), set=overrides), home)
    assert AdapterLibrary(home).list() == []


def test_cli_refuses_a_taken_name_before_training(trained, tmp_path):
    _, library, _, _ = trained
    with pytest.raises(AlreadyExistsError, match="'toy' already exists"):
        train_from_cli(_args(images=str(_images(tmp_path / "i", 1)), name="toy"), library.home)


def test_full_fine_tune_saves_a_diffusers_folder_that_loads_as_a_base_model(tiny_sd1_pipe, home, tmp_path):
    from studio.base_models import load_base_model
    from trainers.dreambooth import FineTunedModel

    library = AdapterLibrary(home.ensure())
    result = train_dreambooth(_config("mode=full", "steps=1", "lr=1e-3"), _images(tmp_path / "images", 1),
                              _base(tiny_sd1_pipe), name="full", library=library, run_dir=home.runs / "f")  # fmt: skip
    assert isinstance(result, FineTunedModel) and result.path == home.root / "models" / "full"
    assert json.loads((result.path / "studio_model.json").read_text())["mode"] == "full"
    tuned = load_base_model(str(result.path))
    weight = "conv_in.weight"
    assert not torch.equal(tuned.pipeline.unet.state_dict()[weight], tiny_sd1_pipe.unet.state_dict()[weight])
    assert library.list() == []

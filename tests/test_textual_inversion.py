"""Textual-inversion trainer: only the new rows train, configs are strict, runs resume exactly, the CLI is clean."""

from __future__ import annotations

import pytest
import torch

from studio.base_models import BaseModel
from studio.errors import InvalidInputError, NotFoundError
from studio.home import StudioHome
from studio.library import AdapterLibrary
from studio.testing import build_tiny_sd1_pipeline, build_tiny_sdxl_pipeline
from studio.world.concepts import SHIPPED_CONCEPTS, write_reference_folder
from trainers.core.config import load_config
from trainers.core.embeddings import init_vector
from trainers.core.progress import LossHistory
from trainers.textual_inversion import (
    TextualInversionConfig,
    bundle_embedding_keys,
    split_pivotal_adapter,
    train_textual_inversion,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("robot")
    write_reference_folder(SHIPPED_CONCEPTS["robot-toy"], folder, count=3, with_captions=True)
    return folder


def _config(**overrides) -> TextualInversionConfig:
    values = {"placeholder_token": "<my-toy>", "init_word": "toy", "steps": 3, "batch_size": 2, "lr": 5e-2}
    values.update(overrides)
    return TextualInversionConfig(**values)


def _train(images, tmp_path, builder=build_tiny_sd1_pipeline, name="toy", **overrides):
    base = BaseModel.from_pipeline(builder(), "tiny-random")
    library = AdapterLibrary(StudioHome(tmp_path / "home"))
    config = _config(**overrides)
    info = train_textual_inversion(config, images, base, name=name, library=library, run_dir=tmp_path / f"run-{name}")
    return base, library, info


# --- training --------------------------------------------------------------------------------------------------------


def test_training_changes_only_the_placeholder_rows(images, tmp_path):
    original = build_tiny_sd1_pipeline()
    table = original.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = {k: v.clone() for k, v in original.unet.state_dict().items()}
    base, library, info = _train(images, tmp_path, num_vectors=2)

    # The whole original table is bit-identical; only rows were added.
    after = base.pipeline.text_encoder.get_input_embeddings().weight.detach()
    assert after.shape[0] == table.shape[0] + 2
    assert torch.equal(after[: table.shape[0]], table)
    assert all(torch.equal(unet_before[k], v) for k, v in base.pipeline.unet.state_dict().items())

    # The adapter: [2, 32] under emb_params, moved away from the init word, placeholder in the metadata.
    adapter = library.load("toy")
    assert info.kind == "textual_inversion" and info.placeholder_tokens == ["<my-toy>"]
    vectors = adapter.tensors["emb_params"]
    assert vectors.shape == (2, 32)
    start = init_vector(original.tokenizer, original.text_encoder, "toy")
    assert not torch.allclose(vectors[0], start)
    assert adapter.metadata.config["init_word"] == "toy"
    assert adapter.metadata.base_fingerprint == BaseModel.from_pipeline(build_tiny_sd1_pipeline(), "x").fingerprint


def test_sdxl_trains_one_embedding_per_text_encoder(images, tmp_path):
    original = build_tiny_sdxl_pipeline()
    tables = [
        e.get_input_embeddings().weight.detach().clone() for e in (original.text_encoder, original.text_encoder_2)
    ]
    base, library, _ = _train(images, tmp_path, builder=build_tiny_sdxl_pipeline, steps=2)
    adapter = library.load("toy")
    assert sorted(adapter.tensors) == ["clip_g", "clip_l"]
    assert adapter.tensors["clip_l"].shape == (1, 32) and adapter.tensors["clip_g"].shape == (1, 32)
    for encoder, table in zip((base.pipeline.text_encoder, base.pipeline.text_encoder_2), tables, strict=True):
        assert torch.equal(encoder.get_input_embeddings().weight.detach()[: table.shape[0]], table)


def test_captions_core_and_pivotal_make_one_lora_with_the_bundled_embedding(images, tmp_path):
    history = LossHistory()
    base = BaseModel.from_pipeline(build_tiny_sd1_pipeline(), "tiny-random")
    library = AdapterLibrary(StudioHome(tmp_path / "home"))
    config = _config(pivotal=True, core_weight=1.0, use_captions=True, num_vectors=2, steps=2)
    info = train_textual_inversion(
        config, images, base, name="piv", library=library, run_dir=tmp_path / "run", progress=history
    )
    assert history.steps == [1, 2] and all(loss > 0 for loss in history.losses)
    adapter = library.load("piv")
    assert info.kind == "lora" and adapter.metadata.placeholder_tokens == ["<my-toy>"]
    key = "bundle_emb.<my-toy>.string_to_param.*"
    assert adapter.tensors[key].shape == (2, 32)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in adapter.tensors)
    assert adapter.metadata.extra["modelspec.trigger_phrase"] == "<my-toy>"
    lora, embedding = split_pivotal_adapter(adapter)
    assert not any(k.startswith("bundle_emb") for k in lora.tensors)
    assert embedding.metadata.kind == "textual_inversion" and torch.equal(
        embedding.tensors["emb_params"], adapter.tensors[key]
    )
    # The training LoRA left the U-Net: it is the stock module again.
    assert not any("lora" in name for name, _ in base.pipeline.unet.named_modules())
    # Exported as a LoRA plus an embedding, both parts load with diffusers' own loaders.
    pipe = build_tiny_sd1_pipeline()
    pipe.load_lora_weights(dict(lora.tensors), adapter_name="piv")
    pipe.load_textual_inversion(embedding.tensors["emb_params"], token="<my-toy>")
    assert pipe.get_list_adapters() == {"unet": ["piv"]}
    assert len(pipe.tokenizer) == 49408 + 2


def test_bundle_keys_follow_a1111():
    from studio.families import SD1, SDXL

    assert bundle_embedding_keys(SD1, "<t>") == ["bundle_emb.<t>.string_to_param.*"]
    assert bundle_embedding_keys(SDXL, "<t>") == ["bundle_emb.<t>.clip_l", "bundle_emb.<t>.clip_g"]


# --- config, resume, CLI ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["placeholder_token=toy"], "placeholder_token"),
        (["num_vectors=0"], "num_vectors"),
        (["init_word=<my-toy>"], "init_word"),
        (["learnable_property=person"], "learnable_property"),
        (["lr=-1"], "'lr'"),
        (["resolution=60"], "resolution"),
        (["num_vector=2"], "did you mean 'num_vectors'"),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(overrides, match):
    with pytest.raises(InvalidInputError, match=match) as error:
        load_config(
            TextualInversionConfig,
            values={"placeholder_token": "<my-toy>", "init_word": "toy"},
            overrides=overrides,
        )
    assert "\n" not in str(error.value)


def test_a_placeholder_the_tokenizer_has_is_refused_before_anything_is_written(images, tmp_path):
    pipe = build_tiny_sd1_pipeline()
    pipe.tokenizer.add_tokens(["<my-toy>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    library = AdapterLibrary(StudioHome(tmp_path / "home"))
    with pytest.raises(InvalidInputError, match="already has <my-toy>"):
        train_textual_inversion(
            _config(), images, BaseModel.from_pipeline(pipe, "t"), name="x", library=library, run_dir=tmp_path / "r"
        )
    assert library.list() == []


def test_resume_continues_exactly_and_nothing_half_made_reaches_the_library(images, tmp_path):
    config = _config(steps=4, checkpoint_every=2)
    library = AdapterLibrary(StudioHome(tmp_path / "home"))

    def base():
        return BaseModel.from_pipeline(build_tiny_sd1_pipeline(), "tiny-random")

    train_textual_inversion(config, images, base(), name="straight", library=library, run_dir=tmp_path / "a")

    def interrupt(event):
        if event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_textual_inversion(
            config, images, base(), name="resumed", library=library, run_dir=tmp_path / "b", progress=interrupt
        )
    assert [info.name for info in library.list()] == ["straight"]
    assert (tmp_path / "b" / "checkpoint-2").is_dir()
    with pytest.raises(InvalidInputError, match="num_vectors"):
        train_textual_inversion(
            _config(steps=4, checkpoint_every=2, num_vectors=2),
            images,
            base(),
            name="resumed",
            library=library,
            run_dir=tmp_path / "b",
            resume=True,
        )
    train_textual_inversion(
        config, images, base(), name="resumed", library=library, run_dir=tmp_path / "b", resume=True
    )
    assert torch.equal(library.load("straight").tensors["emb_params"], library.load("resumed").tensors["emb_params"])
    with pytest.raises(NotFoundError, match="no complete checkpoint"):
        train_textual_inversion(config, images, base(), name="c", library=library, run_dir=tmp_path / "c", resume=True)


def test_cli_trains_into_the_library_and_reports_errors_in_one_line(images, tmp_path, capsys):
    from studio.cli import main

    model = tmp_path / "model"
    build_tiny_sd1_pipeline().save_pretrained(model)
    capsys.readouterr()
    home = tmp_path / "home"
    common = ["train", "textual-inversion", "--images", str(images), "--base", str(model), "--home", str(home)]
    code = main([*common, "--name", "bad", "--token", "my-toy", "--init-word", "toy"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key 'placeholder_token'") and "\n" not in err
    code = main(
        [*common, "--name", "cli-toy", "--token", "<cli-toy>", "--init-word", "toy", "--num-vectors", "2"]
        + ["--set", "steps=2", "--set", "batch_size=1"]
    )
    assert code == 0, capsys.readouterr().err
    infos = AdapterLibrary(StudioHome(home)).list()
    assert [(i.name, i.placeholder_tokens) for i in infos] == [("cli-toy", ["<cli-toy>"])]
    assert AdapterLibrary(StudioHome(home)).load("cli-toy").tensors["emb_params"].shape == (2, 32)

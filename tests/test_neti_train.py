"""NeTI training: a step trains the mapper only (SD1.x and SDXL), checkpoints resume, and the CLI stores the adapter."""

from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image

from studio.base_models import BaseModel
from studio.errors import InvalidInputError
from studio.families import SD1
from studio.library import AdapterLibrary
from studio.testing import build_tiny_sd1_pipeline, build_tiny_sdxl_pipeline, tiny_model_path
from trainers.core.config import load_config
from trainers.core.progress import LossHistory
from trainers.neti import NetiConfig, build_mapper, mapper_from_adapter, train_from_cli, train_neti

TOKEN = "<my-toy>"


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        Image.new("RGB", (32, 32), colour).save(folder / f"{index}.png")
    return folder


def _config(*overrides: str) -> NetiConfig:
    base = [f"placeholder_token={TOKEN}", "super_category=toy", "batch_size=1", "gradient_accumulation_steps=1"]
    return load_config(NetiConfig, overrides=[*base, "resolution=32", *overrides])


def _count_text_encoder_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of each `ConditioningEncoder.encode` call (prompts x rows per prompt), appended as training runs."""
    from trainers.neti import ConditioningEncoder

    rows: list[int] = []
    encode = ConditioningEncoder.encode

    def spy(self, prompts, outputs, rows_per_prompt):  # noqa: ANN001, ANN202
        rows.append(prompts.input_ids[0].shape[0] * rows_per_prompt)
        return encode(self, prompts, outputs, rows_per_prompt)

    monkeypatch.setattr(ConditioningEncoder, "encode", spy)
    return rows


def _spy_row_truncations(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The ``rows`` truncations each `NetiMapper.nested_dropout` call is given, appended as training runs."""
    from trainers.neti import NetiMapper

    given: list[torch.Tensor] = []
    dropout = NetiMapper.nested_dropout

    def spy(self, h, truncation, p, rows=None):  # noqa: ANN001, ANN202
        given.append(rows)
        return dropout(self, h, truncation, p, rows)

    monkeypatch.setattr(NetiMapper, "nested_dropout", spy)
    return given


@torch.no_grad()
def _frozen_digest(pipe) -> float:  # noqa: ANN001
    return float(
        sum(p.double().sum() for p in pipe.unet.parameters())
        + pipe.text_encoder.get_input_embeddings().weight.double().sum()
    )


def test_sdxl_neti_trains_a_step_and_changes_only_the_mapper(images):
    pipe = build_tiny_sdxl_pipeline()
    before = _frozen_digest(pipe)
    processors = dict(pipe.unet.attn_processors)
    history = LossHistory()
    adapter = train_neti(_config("steps=1"), BaseModel.from_pipeline(pipe, "tiny-xl"), images, callbacks=[history])
    mapper = mapper_from_adapter(adapter)
    assert adapter.metadata.family == "sdxl" and mapper.spec.widths == (32, 32)
    assert history.steps == [1] and all(torch.isfinite(torch.tensor(history.losses)))
    assert _frozen_digest(pipe) == before, "the base model is frozen"
    assert dict(pipe.unet.attn_processors) == processors, "the training processors are removed afterwards"


def test_sd1_training_moves_the_mapper_and_resumes_from_its_checkpoint(images, tmp_path):
    pipe = build_tiny_sd1_pipeline()
    base = BaseModel.from_pipeline(pipe, "tiny-random")
    run = tmp_path / "run"
    first = train_neti(_config("steps=2", "checkpoint_every=1"), base, images, run_dir=run)
    assert (run / "checkpoint-2").is_dir()
    history = LossHistory()
    resumed = train_neti(_config("steps=3"), base, images, run_dir=run, resume=True, callbacks=[history])
    assert history.steps == [3], "a resumed run continues after its last checkpoint"
    fresh = build_mapper(_config(), pipe, SD1, len(SD1.cross_attention_layers(pipe.unet)))  # the initial weights
    moved = mapper_from_adapter(first)
    assert not torch.equal(moved.output_layer.weight, fresh.output_layer.weight)
    assert torch.equal(moved.w, mapper_from_adapter(resumed).w), "w is fixed by the seed"


def test_cli_trains_into_the_library(images, home, monkeypatch):
    monkeypatch.setattr(
        "studio.base_models.load_base_model", lambda spec: BaseModel.from_pipeline(build_tiny_sd1_pipeline(), spec)
    )
    args = argparse.Namespace(
        images=str(images),
        token=TOKEN,
        super_category="toy",
        config=None,
        set=["steps=1", "batch_size=1", "gradient_accumulation_steps=1", "resolution=32"],
        resume=None,
        name="toy",
        base="tiny",
    )
    assert train_from_cli(args, home) == 0
    info = AdapterLibrary(home).show("toy")
    assert info.kind == "neti" and info.placeholder_tokens == [TOKEN]
    # On the embedded base the studio's measured recipe applies where --set is silent (BASE_RECIPES["tiny"]).
    spec = mapper_from_adapter(AdapterLibrary(home).load("toy")).spec
    assert spec.hidden_width == 32 and spec.num_vectors == 4
    args.token, args.name = "toy", "other"
    with pytest.raises(InvalidInputError, match="placeholder_token"):
        train_from_cli(args, home)


def test_training_noise_matches_the_timestep_whatever_the_pipeline_scheduler(images, monkeypatch):
    """Regression: with DPMSolverMultistep as the pipeline's scheduler, its add_noise gave timestep t the noise of
    999 - t (or of the grid's last step after a generation); training noise must follow the DDPM schedule."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    pipe = build_tiny_sd1_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(3)  # as after a generation
    monkeypatch.setattr("trainers.core.noise.sample_noise", lambda latents, generator: torch.ones_like(latents))
    monkeypatch.setattr("trainers.neti._load_latents", lambda *args: torch.zeros(2, 4, 4, 4))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append((args[0].detach(), args[1])))
    try:
        train_neti(_config("steps=2", "batch_size=2"), BaseModel.from_pipeline(pipe, "tiny-random"), images)
    finally:
        hook.remove()
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    for noisy, timesteps in seen:
        expected = (1 - alphas[timesteps]).sqrt()  # clean latents 0, noise 1: the noisy latent is sigma_t
        assert torch.allclose(noisy.flatten(1).mean(dim=1), expected, atol=1e-5), (timesteps, expected)


def test_frozen_super_category_bias_stays_at_the_word_with_several_vectors(images):
    pipe = build_tiny_sd1_pipeline()
    options = ("steps=2", "num_vectors=2", "init_from_super_category=true", "freeze_super_category=true")
    config = _config(*options)
    start = build_mapper(config, pipe, SD1, len(SD1.cross_attention_layers(pipe.unet)))
    trained = mapper_from_adapter(train_neti(config, BaseModel.from_pipeline(pipe, "tiny-random"), images))
    assert trained.spec.num_vectors == 2 and trained.output_layer.out_features == 2 * 2 * 32
    words = slice(0, 2 * 32)  # the embedding rows of the bias: the word, for each vector
    # AdamW's decoupled weight decay still shrinks them by lr * decay per step, nothing else moves them.
    assert torch.allclose(trained.output_layer.bias[words], start.output_layer.bias[words], rtol=1e-3)
    assert not torch.equal(trained.output_layer.bias[64:], start.output_layer.bias[64:]), "the bypass rows train"
    assert not torch.equal(trained.output_layer.weight, start.output_layer.weight)


@pytest.mark.parametrize("build", [build_tiny_sd1_pipeline, build_tiny_sdxl_pipeline], ids=["sd1", "sdxl"])
def test_conditioning_groups_share_one_prompt_and_timestep_per_group(images, monkeypatch, build):
    """With conditioning_groups=1 a batch of 3 runs the text encoder over n_layers rows (not 3 x n_layers), every
    image sees the same timestep, and the U-Net still gets the whole batch (SDXL's pooled embedding included)."""
    pipe = build()
    base = BaseModel.from_pipeline(pipe, "tiny-random")
    n_layers = len(base.family.cross_attention_layers(pipe.unet))
    rows = _count_text_encoder_rows(monkeypatch)
    seen: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    try:
        config = _config("steps=2", "batch_size=3", "conditioning_groups=1")
        train_neti(config, base, images)
    finally:
        hook.remove()
    assert rows == [n_layers, n_layers], "one batched call per step over one prompt's layer rows"
    assert all(t.shape == (3,) and bool((t == t[0]).all()) for t in seen), "the batch's images share the timestep"


def test_conditioning_groups_cannot_exceed_the_batch():
    with pytest.raises(InvalidInputError, match="conditioning_groups"):
        _config("batch_size=2", "conditioning_groups=3")


def test_context_loss_compares_the_words_after_the_placeholder_with_those_after_the_word():
    from trainers.neti import context_preservation_loss

    torch.manual_seed(0)
    target = torch.randn(10, 4)  # "BOS a toy on the beach EOS pad pad pad": the word at position 2
    slots = torch.zeros(10, dtype=torch.bool)
    slots[2:4] = True  # the placeholder takes 2 positions, so its words come one position later
    states = torch.randn(3, 10, 4)
    states[:, 4:] = target[3:9]  # after the placeholder: exactly the word prompt's states
    assert float(context_preservation_loss(states, slots, target, word_length=1)) == pytest.approx(0.0, abs=1e-6)
    states[1, 6] = -target[5]  # one position of one row turned around: cosine -1 there
    expected = 2.0 / (3 * 6)  # mean of 1 - cos over 3 rows x 6 compared positions
    assert float(context_preservation_loss(states, slots, target, word_length=1)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("build", [build_tiny_sd1_pipeline, build_tiny_sdxl_pipeline], ids=["sd1", "sdxl"])
def test_context_regularisation_joins_the_one_batched_text_encoder_call(images, monkeypatch, build):
    pipe = build()
    base = BaseModel.from_pipeline(pipe, "tiny-random")
    n_layers = len(base.family.cross_attention_layers(pipe.unet))
    rows = _count_text_encoder_rows(monkeypatch)
    history = LossHistory()
    train_neti(_config("steps=2", "batch_size=2", "context_weight=1"), base, images, callbacks=[history])
    assert rows == [3 * n_layers, 3 * n_layers], "2 training prompts and 1 context prompt, every layer, one call"
    assert all(torch.isfinite(torch.tensor(history.losses)))


def test_context_weight_cannot_be_negative():
    with pytest.raises(InvalidInputError, match="context_weight"):
        _config("context_weight=-1")


def test_context_dial_weights_fall_from_one_at_truncation_zero_to_none_at_full():
    from trainers.neti import context_dial_weights

    truncations = torch.tensor([0, 32, 64, 128])
    assert context_dial_weights(truncations, 128, 1.0).tolist() == [1.0, 0.75, 0.5, 0.0]
    assert context_dial_weights(truncations, 128, 2.0).tolist() == [1.0, 0.5625, 0.25, 0.0]


def test_context_loss_per_row_gives_each_row_its_own_mean():
    from trainers.neti import context_preservation_loss

    torch.manual_seed(0)
    target = torch.randn(10, 4)
    slots = torch.zeros(10, dtype=torch.bool)
    slots[2] = True
    states = torch.randn(3, 10, 4)
    states[:, 3:] = target[3:]
    states[1, 5] = -target[5]  # cosine -1 at one of row 1's 7 compared positions
    per_row = context_preservation_loss(states, slots, target, word_length=1, per_row=True)
    assert per_row.shape == (3,)
    assert torch.allclose(per_row, torch.tensor([0.0, 2.0 / 7, 0.0]), atol=1e-6)


def test_fixed_row_truncations_override_nested_dropout_in_training_only():
    pipe = build_tiny_sd1_pipeline()
    mapper = build_mapper(_config(), pipe, SD1, len(SD1.cross_attention_layers(pipe.unet))).train()
    h = torch.ones(3, mapper.spec.hidden_width)
    kept = mapper.nested_dropout(h, None, p=0.0, rows=torch.tensor([-1, 3, 0]))
    assert kept[0].sum() == mapper.spec.hidden_width, "a row marked -1 takes nested dropout's draw (none at p=0)"
    assert kept[1].tolist() == [1.0] * 3 + [0.0] * (mapper.spec.hidden_width - 3)
    assert kept[2].sum() == 0
    assert torch.equal(mapper.eval().nested_dropout(h, None, p=0.0, rows=torch.tensor([0, 0, 0])), h)


def test_context_dial_truncates_the_context_rows_in_the_one_batched_call(images, monkeypatch):
    """The context prompt's rows carry the truncations their loss weights refer to; the training rows do not."""
    pipe = build_tiny_sd1_pipeline()
    base = BaseModel.from_pipeline(pipe, "tiny-random")
    n_layers = len(base.family.cross_attention_layers(pipe.unet))
    rows = _count_text_encoder_rows(monkeypatch)
    given = _spy_row_truncations(monkeypatch)
    history = LossHistory()
    config = _config("steps=2", "batch_size=2", "context_weight=1", "context_dial=1", "nested_dropout=0")
    train_neti(config, base, images, callbacks=[history])
    assert rows == [3 * n_layers, 3 * n_layers], "2 training prompts and 1 context prompt, every layer, one call"
    for truncations in given:
        assert truncations.shape == (3 * n_layers,)
        assert bool((truncations[: 2 * n_layers] == -1).all()), "training rows: nested dropout's own draw"
        assert bool(((truncations[2 * n_layers :] >= 0) & (truncations[2 * n_layers :] < 128)).all())
    assert all(torch.isfinite(torch.tensor(history.losses)))


def test_nested_dropout_per_prompt_truncates_all_layers_of_a_prompt_alike(images, monkeypatch):
    """As at generation, where one truncation applies to every layer, each prompt's layer rows share one draw."""
    pipe = build_tiny_sd1_pipeline()
    base = BaseModel.from_pipeline(pipe, "tiny-random")
    n_layers = len(base.family.cross_attention_layers(pipe.unet))
    given = _spy_row_truncations(monkeypatch)
    config = _config("steps=3", "batch_size=2", "nested_dropout=1", "nested_dropout_per_prompt=true")
    train_neti(config, base, images)
    assert len(given) == 3
    for truncations in given:
        per_prompt = truncations.view(2, n_layers)
        assert bool((per_prompt == per_prompt[:, :1]).all()) and bool((per_prompt >= 0).all())


def test_log_nested_dropout_draws_the_dials_low_end_as_often_as_its_high_end(images, monkeypatch):
    """``nested_dropout_sampling=log``: the loop draws each row's truncation, and nearly half land below 8, where a
    uniform draw puts 1 in 16."""
    from trainers.neti import draw_truncations

    pipe = build_tiny_sd1_pipeline()
    base = BaseModel.from_pipeline(pipe, "tiny-random")
    n_layers = len(base.family.cross_attention_layers(pipe.unet))
    given = _spy_row_truncations(monkeypatch)
    train_neti(_config("steps=2", "batch_size=2", "nested_dropout=1", "nested_dropout_sampling=log"), base, images)
    assert [t.shape for t in given] == [(2 * n_layers,)] * 2
    assert all(bool(((t >= 0) & (t < 128)).all()) for t in given)
    draws = draw_truncations((20000,), 128, "log", torch.Generator().manual_seed(0))
    assert 0.4 < float((draws < 8).float().mean()) < 0.5 and int(draws.max()) == 127
    uniform = draw_truncations((20000,), 128, "uniform", torch.Generator().manual_seed(0))
    assert float((uniform < 8).float().mean()) < 0.08


def test_queued_neti_runs_take_the_base_models_recipe_unless_a_key_is_set(images, home):
    from studio.jobs import submit

    values = {"placeholder_token": TOKEN, "super_category": "toy"}
    on_tiny = submit(home, "neti", name="a", images=images, base="tiny", values=values).config["config"]
    assert on_tiny["hidden_width"] == 32 and on_tiny["context_dial"] == 1.0 and on_tiny["steps"] == 225
    typed = submit(home, "neti", name="b", images=images, base="tiny", values=values, overrides=["hidden_width=64"])
    assert typed.config["config"]["hidden_width"] == 64 and typed.config["config"]["num_vectors"] == 4
    elsewhere = submit(home, "neti", name="c", images=images, base="some/sd15", values=values).config["config"]
    assert elsewhere["hidden_width"] == NetiConfig.hidden_width and elsewhere["steps"] == NetiConfig.steps
    by_path = submit(home, "neti", name="d", images=images, base=str(tiny_model_path()), values=values)
    assert by_path.config["config"]["hidden_width"] == 32, "the embedded model's folder is tiny too"

"""Preference adapters: the DPO loss, per-user and population training, and generation through the shared pipeline
(strength, interpolation, attribute guidance, composition with a LoRA), on tiny random models."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline_helpers import pixels, random_lora, tiny_base, write

from pipelines.kinds.conditioning import ConditionedAttnProcessor
from pipelines.kinds.preference import (
    TOKENS_KEY,
    PreferenceBranches,
    attribute_preference,
    combine_attribute_guidance,
    interpolate_preferences,
)
from pipelines.requests import AdapterRef, GenerationRequest
from pipelines.service import PipelineService
from studio.adapter_files import AdapterFile, AdapterMetadata, save_adapter
from studio.errors import InvalidInputError, NotAvailableError, StudioError
from studio.preferences import PreferencePair
from studio.testing import tiny_model_path
from studio.world.judge import JudgeNet
from trainers.core.config import load_config
from trainers.preference import (
    DEFAULT_STEPS,
    GUIDED_KEY,
    SHIPPED_STARTS,
    WINDOWS_KEY,
    AttributeExample,
    ClipVisionFeatures,
    JudgeFeatures,
    PreferenceConfig,
    UtilityPrior,
    diffusion_dpo_loss,
    embed_user,
    fit_attribute_utilities,
    load_branch,
    phrase_tokens,
    resolve_start,
    start_from,
    train_attribute_branch,
    train_population,
    train_user_preference,
)

STEPS = 3
PROMPT = "a red circle"
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")


def pairs_of(user: str, count: int) -> list[PreferencePair]:
    return [
        PreferencePair(
            user,
            f"a shape number {i}",
            Image.new("RGB", (64, 64), COLOURS[i % len(COLOURS)]),
            Image.new("RGB", (64, 64), COLOURS[(i + 3) % len(COLOURS)]),
        )
        for i in range(count)
    ]


def user_adapter(user: str, seed: int, width: int = 32, scale: float = 3.0) -> AdapterFile:
    tokens = torch.randn(4, width, generator=torch.Generator().manual_seed(seed)) * scale
    meta = AdapterMetadata(kind="preference", family="sd1", config={"mode": "user", "user_id": user})
    return AdapterFile({TOKENS_KEY: tokens}, meta)


def test_dpo_loss_matches_a_hand_computation():
    # Two pairs, 1x1x2 "images"; errors are means over channels and pixels.
    target = torch.zeros(2, 1, 1, 2)
    model_w = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 2.0]]]])  # err_w = 1, 2
    model_l = torch.tensor([[[[2.0, 0.0]]], [[[1.0, 1.0]]]])  # err_l = 2, 1
    ref_w = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])  # ref_w = 0.5, 1
    ref_l = torch.tensor([[[[1.0, 1.0]]], [[[1.0, 1.0]]]])  # ref_l = 1, 1
    beta = 0.5
    inside = [-0.5 * beta * ((1 - 2) - (0.5 - 1)), -0.5 * beta * ((2 - 1) - (1 - 1))]  # [0.125, -0.25]
    expected = sum(math.log1p(math.exp(-x)) for x in inside) / 2
    result = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, target, target, beta=beta)
    assert float(result.loss) == pytest.approx(expected, rel=1e-6)
    assert result.inside.tolist() == pytest.approx(inside)
    assert result.accuracy == 0.5

    # The gradient reaches the model's predictions only.
    model_w.requires_grad_(True)
    ref_w.requires_grad_(True)
    diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, target, target, beta=beta).loss.backward()
    assert model_w.grad is not None and model_w.grad.abs().sum() > 0
    assert ref_w.grad is None


def test_per_user_training_changes_only_the_user_tokens():
    base = tiny_base()
    pipe = base.pipeline
    before = {
        name: {k: v.clone() for k, v in module.state_dict().items()}
        for name, module in (("unet", pipe.unet), ("vae", pipe.vae), ("text", pipe.text_encoder))
    }
    processors = dict(pipe.unet.attn_processors)
    cfg = PreferenceConfig(steps=3, batch_size=2, log_every=1, lr=0.1)
    events = []
    adapter = train_user_preference(cfg, pairs_of("alice", 4), base, progress=[events.append])

    assert set(adapter.tensors) == {TOKENS_KEY}
    tokens = adapter.tensors[TOKENS_KEY]
    assert tokens.shape == (4, 32) and tokens.abs().sum() > 0
    for name, module in (("unet", pipe.unet), ("vae", pipe.vae), ("text", pipe.text_encoder)):
        after = module.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), f"{name} weights changed"
    assert dict(pipe.unet.attn_processors) == processors, "training leaves the U-Net's processors as it found them"
    config = adapter.metadata.config
    assert (config["mode"], config["user_id"], config["tokens"], config["beta"]) == ("user", "alice", 4, 5000.0)
    assert config["training"]["steps"] == 3 and 0.0 <= config["final_implicit_accuracy"] <= 1.0
    assert [e.step for e in events] == [1, 2, 3] and "implicit accuracy" in events[-1].message

    with pytest.raises(InvalidInputError, match="one user"):
        train_user_preference(cfg, pairs_of("alice", 2) + pairs_of("bob", 2), base)


def test_norm_matched_tokens_speak_as_loudly_as_the_prompts_words():
    base = tiny_base()
    pairs = pairs_of("alice", 4)
    cfg = PreferenceConfig(steps=2, batch_size=2, lr=0.1, token_norm=0.5)
    tokens = train_user_preference(cfg, pairs, base).tensors[TOKENS_KEY]
    states = base.pipeline.encode_prompt(
        prompt=[pair.prompt for pair in pairs], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )[0]
    # Every token row keeps half the text states' typical norm whatever DPO does: training turns them, never mutes.
    expected = 0.5 * float(states.norm(dim=-1).median())
    assert torch.allclose(tokens.norm(dim=-1), torch.full((4,), expected), rtol=1e-4)


def test_per_user_tokens_start_from_the_attributes_that_explain_the_picks():
    base = tiny_base()
    candidates = ("red", "blue", "black background", "large")
    cfg = PreferenceConfig(steps=1, batch_size=2, lr=1e-12, init_attributes=candidates, init_top=2, init_draws=1)
    adapter = train_user_preference(cfg, pairs_of("alice", 4), base)
    chosen = adapter.metadata.config["initial_attributes"]
    assert len(chosen) <= 2 and set(chosen) <= set(candidates)
    tokens = adapter.tensors[TOKENS_KEY]
    # One step at a vanishing learning rate leaves the start: each chosen attribute's text states (a group of 4
    # tokens), or zero tokens without one.
    groups = [phrase_tokens(base.pipeline, attribute, 4, torch.device("cpu")) for attribute in chosen]
    assert torch.allclose(tokens, torch.cat(groups) if chosen else torch.zeros(4, 32), atol=1e-6)
    if chosen:
        config = adapter.metadata.config
        assert config["attribute_groups"] == chosen and config["tokens_per_attribute"] == 4
    assert adapter.metadata.config["training"]["init_attributes"] == list(candidates)
    # The choice is a function of the pairs and the seed.
    again = train_user_preference(cfg, pairs_of("alice", 4), base)
    assert again.metadata.config["initial_attributes"] == chosen


class ColourReader:
    """A stand-in attribute reader for solid-colour images: a colour word is present where the image has it."""

    name = "colour"

    def presence(self, images, attributes):
        from PIL import ImageColor

        return torch.tensor(
            [
                [float(a in COLOURS and image.getpixel((0, 0)) == ImageColor.getrgb(a)) for a in attributes]
                for image in images
            ]
        )


def test_the_reader_start_takes_the_attribute_the_picks_favour():
    base = tiny_base()
    # Alice always picks the red image, whatever it is compared with.
    pairs = [
        PreferencePair("alice", f"a shape number {i}", Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), c))
        for i, c in enumerate(("blue", "green", "yellow", "black", "white", "purple"))
    ]
    candidates = ("red", "blue", "green", "black background", "large")
    cfg = PreferenceConfig(
        steps=1, batch_size=2, lr=1e-12, init_attributes=candidates, init_reader="colour", init_top=3
    )
    adapter = train_user_preference(cfg, pairs, base, attribute_reader=ColourReader())
    config = adapter.metadata.config
    # Red leads the colour slot; nothing in the images speaks for a background or a size, so those stay open.
    assert config["initial_attributes"] == ["red"] and config["initial_fit"] == 1.0
    expected = phrase_tokens(base.pipeline, "red", 4, torch.device("cpu"))
    assert torch.allclose(adapter.tensors[TOKENS_KEY], expected, atol=1e-6)


def test_the_reader_start_stays_empty_when_the_picks_favour_nothing():
    base = tiny_base()
    # Each colour is picked as often as it is passed over: the picks carry no taste for a colour.
    pairs = pairs_of("alice", 4) + [replace(p, preferred=p.other, other=p.preferred) for p in pairs_of("alice", 4)]
    cfg = PreferenceConfig(steps=1, batch_size=2, lr=1e-12, init_attributes=("red", "blue"), init_reader="colour")
    adapter = train_user_preference(cfg, pairs, base, attribute_reader=ColourReader())
    assert adapter.metadata.config["initial_attributes"] == []
    # Zero tokens (one Adam step at a vanishing learning rate moves them by about that rate): the base model.
    assert float(adapter.tensors[TOKENS_KEY].abs().max()) < 1e-9


def test_the_reader_start_needs_candidates_and_a_known_reader():
    with pytest.raises(InvalidInputError, match="init_attributes"):
        load_config(PreferenceConfig, overrides=["init_reader=judge"])
    cfg = PreferenceConfig(steps=1, init_attributes=("red",), init_reader="clip-someday")
    with pytest.raises(NotAvailableError, match="not available yet"):
        train_user_preference(cfg, pairs_of("alice", 4), tiny_base())


class SizeReader(ColourReader):
    """Colours as `ColourReader`, and "large"/"small" from the share of the image that is not white."""

    name = "size"

    def presence(self, images, attributes):
        colours = super().presence(images, attributes)
        for row, image in enumerate(images):
            covered = float((np.asarray(image.convert("RGB")) != 255).any(axis=-1).mean())
            for column, attribute in enumerate(attributes):
                if attribute in ("large", "small"):
                    colours[row, column] = covered if attribute == "large" else 1.0 - covered
        return colours


def square(colour: str, side: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    image.paste(Image.new("RGB", (side, side), colour), (8, 8))
    return image


def test_a_user_who_picks_the_larger_object_is_guided_towards_large():
    base = tiny_base()
    # Bo picks the larger square whatever its colour; the colours come in both orders, so they explain nothing.
    pairs = [
        PreferencePair("bo", f"a square {i}", square(a, 40), square(b, 16))
        for i, (a, b) in enumerate((("red", "blue"), ("blue", "red"), ("green", "red"), ("red", "green")))
    ]
    keys = {"init_attributes": ("red", "blue", "green"), "init_reader": "size", "steps": 1, "batch_size": 2}
    cfg = PreferenceConfig(lr=1e-12, guided_attributes=("large/small",), **keys)
    config = train_user_preference(cfg, pairs, base, attribute_reader=SizeReader()).metadata.config
    assert config["prompt_words"] == ["large"] and "liked" not in config
    # Reversed picks read the other pole; a scale of 0 guides nothing.
    flipped = [replace(p, preferred=p.other, other=p.preferred) for p in pairs]
    config = train_user_preference(cfg, flipped, base, attribute_reader=SizeReader()).metadata.config
    assert config["prompt_words"] == ["small"]
    off = replace(cfg, guided_scale=0.0)
    assert "prompt_words" not in train_user_preference(off, pairs, base, attribute_reader=SizeReader()).metadata.config
    with pytest.raises(InvalidInputError, match="'large/small'"):
        load_config(PreferenceConfig, overrides=["guided_attributes=large"])


def attribute_lessons(count: int) -> list[AttributeExample]:
    colours = ("red", "blue", "green", "yellow")
    return [
        AttributeExample(f"a shape number {i}", c, f"a {c} shape number {i}", Image.new("RGB", (64, 64), c))
        for i, c in ((i, colours[i % len(colours)]) for i in range(count))
    ]


def test_the_attribute_branch_trains_the_projections_a_user_then_starts_from(tmp_path):
    base = tiny_base()
    cfg = PreferenceConfig(mode="branch", steps=2, batch_size=2, branch_lr=1e-2)
    branch = train_attribute_branch(cfg, attribute_lessons(8), base)
    config = branch.metadata.config
    assert config["mode"] == "branch" and config["attributes"] == ["blue", "green", "red", "yellow"]
    assert {"held_out_error", "held_out_error_untrained", "held_out_error_plain_prompt"} <= set(config)
    layers = {k: v for k, v in branch.tensors.items() if k.startswith("preference.layers.")}
    copies = PreferenceBranches.from_unet(base.pipeline.unet, base.family.cross_attention_layers(base.pipeline.unet))
    assert set(layers) == set(copies.layer_tensors())
    assert any(not torch.equal(layers[k], v) for k, v in copies.layer_tensors().items())  # trained, not the copies
    path = write(tmp_path, "branch", branch)
    # A user trained on it carries the branch's projections unchanged (only the tokens train).
    user = train_user_preference(PreferenceConfig(steps=1, batch_size=2, branch=str(path)), pairs_of("alice", 4), base)
    for key, value in layers.items():
        assert torch.equal(user.tensors[key], value)
    # The branch alone is not something to generate with.
    service = PipelineService(base, adapter_source=tmp_path)
    with pytest.raises(InvalidInputError, match="attribute branch"):
        service.generate(GenerationRequest(prompt=PROMPT, seeds=[0], steps=2, adapters=[AdapterRef("branch")]))


def test_an_attribute_lesson_without_words_learns_from_its_image():
    # An attribute the base model does not draw from words (tiny: an object's size) is taught by its images: the
    # target is the noise added to the image, which the plain prompt misses by far more than it misses the base
    # model's own prediction on the worded prompt.
    base = tiny_base()
    cfg = PreferenceConfig(mode="branch", steps=1, batch_size=2)
    worded = train_attribute_branch(cfg, attribute_lessons(8), base).metadata.config
    pictured = train_attribute_branch(cfg, [replace(e, expanded=None) for e in attribute_lessons(8)], base)
    assert pictured.metadata.config["held_out_error_plain_prompt"] > 10 * worded["held_out_error_plain_prompt"]


def test_a_branch_must_be_a_branch_file(tmp_path):
    base = tiny_base()
    missing = PreferenceConfig(steps=1, batch_size=2, branch=str(tmp_path / "nope.safetensors"))
    with pytest.raises(InvalidInputError, match="found no file"):
        train_user_preference(missing, pairs_of("alice", 4), base)
    path = write(tmp_path, "alice", user_adapter("alice", seed=1))
    with pytest.raises(InvalidInputError, match=r"found preference \(user\)"):
        train_user_preference(PreferenceConfig(steps=1, branch=str(path)), pairs_of("alice", 4), base)
    with pytest.raises(InvalidInputError, match="at least 4 attribute examples"):
        train_attribute_branch(PreferenceConfig(mode="branch", batch_size=2), attribute_lessons(3), base)


def test_a_joint_branch_is_recorded_and_the_users_on_it_attend_jointly(tmp_path):
    base = tiny_base()
    cfg = load_config(PreferenceConfig, overrides=["mode=branch", "steps=1", "batch_size=2", "branch_attention=joint"])
    branch = train_attribute_branch(cfg, attribute_lessons(8), base)
    assert branch.metadata.config["branch_attention"] == "joint"
    path = write(tmp_path, "branch", branch)
    user = train_user_preference(PreferenceConfig(steps=1, batch_size=2, branch=str(path)), pairs_of("alice", 4), base)
    assert user.metadata.config["branch_attention"] == "joint"
    write(tmp_path, "joint", user)
    # The same tokens and projections read through the separate softmax make a different image.
    separate = dict(user.metadata.config, branch_attention="separate")
    write(tmp_path, "separate", AdapterFile(user.tensors, replace(user.metadata, config=separate)))
    service = PipelineService(base, adapter_source=tmp_path)
    assert not np.array_equal(generate(service, "joint"), generate(service, "separate"))
    odd = dict(separate, branch_attention="x")
    write(tmp_path, "odd", AdapterFile(user.tensors, replace(user.metadata, config=odd)))
    with pytest.raises(InvalidInputError, match="expected branch_attention in separate, joint, found 'x'"):
        generate(service, "odd")
    with pytest.raises(InvalidInputError, match="branch_attention"):
        load_config(PreferenceConfig, overrides=["branch_attention=sideways"])


def one_step_branch(tmp_path, base):
    """An attribute-branch file trained for one step (what the population tests build on)."""
    cfg = PreferenceConfig(mode="branch", steps=1, batch_size=2)
    return write(tmp_path, "branch", train_attribute_branch(cfg, attribute_lessons(8), base))


def test_an_attribute_population_embeds_a_new_user_from_a_few_picks(tmp_path):
    base = tiny_base()
    branch = one_step_branch(tmp_path, base)
    # The branch says when in denoising "red" acts; the population and its users carry that along.
    windowed = load_branch(branch)
    windowed.metadata.config[WINDOWS_KEY] = {"red": [0.0, 0.6]}
    save_adapter(branch, windowed)

    def picks(user: str, liked: str, others: tuple[str, ...]) -> list[PreferencePair]:
        return [
            PreferencePair(user, f"a shape {i}", Image.new("RGB", (64, 64), liked), Image.new("RGB", (64, 64), o))
            for i, o in enumerate(others)
        ]

    # Half the population likes red, half blue; each was asked against the other colours.
    population_pairs = [
        pair
        for n in range(4)
        for pair in picks(f"user{n}", ("red", "blue")[n % 2], ("green", "yellow", "white", ("blue", "red")[n % 2]))
    ]
    overrides = {"init_attributes": ("red", "blue", "green"), "init_reader": "size", "branch": str(branch)}
    cfg = PreferenceConfig(
        mode="population",
        population_encoder="attributes",
        context_pairs=2,
        guided_attributes=("large/small",),
        **overrides,
    )
    population = train_population(cfg, population_pairs, base, attribute_reader=SizeReader())
    assert population.metadata.config["users"] == 4
    assert population.metadata.config[GUIDED_KEY] == {"attributes": ["large/small"], "attribute_scale": 0.85}
    # A new user picked red twice: of the population, the red lovers explain that. The solid-colour images all
    # cover the whole picture, so nothing says which size the user likes: none is guided.
    user = embed_user(population, picks("carol", "red", ("green", "yellow")), attribute_reader=SizeReader())
    assert user.metadata.config["attribute_groups"] == ["red"] and "prompt_words" not in user.metadata.config
    larger = [PreferencePair("dave", f"a square {i}", square("red", 40), square("blue", 12)) for i in range(2)]
    dave = embed_user(population, larger, attribute_reader=SizeReader()).metadata.config
    assert dave["prompt_words"] == ["large"]
    assert user.metadata.config["attribute_timesteps"] == [[0.0, 0.6]]
    assert torch.allclose(user.tensors[TOKENS_KEY], phrase_tokens(base.pipeline, "red", 4, torch.device("cpu")))
    write(tmp_path, "carol", user)
    images = PipelineService(base, adapter_source=tmp_path).generate(
        GenerationRequest(prompt="a shape", seeds=[0], steps=2, adapters=[AdapterRef("carol")])
    )
    assert len(images.images) == 1
    with pytest.raises(InvalidInputError, match="branch"):
        load_config(PreferenceConfig, overrides=["mode=population", "population_encoder=attributes"])


def test_a_population_prior_reads_attributes_people_like_together():
    # Candidates: red, orange, blue. In the population red and orange are liked or disliked together (warm colours).
    population = torch.tensor([[1.0, 0.9, -0.5], [-1.0, -0.8, 0.6], [0.8, 1.0, 0.0], [-0.9, -1.0, 0.2]])
    prior = UtilityPrior.from_population(population)
    # A new user's one pick: orange over blue. It says nothing about red by itself.
    picks = torch.tensor([[0.0, 1.0, -1.0]])
    ridge = fit_attribute_utilities(picks, l2=1.0)
    grouped = fit_attribute_utilities(picks, l2=1.0, prior=prior)
    assert float(ridge[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(grouped[0]) > 0.05  # red rises with orange
    with pytest.raises(InvalidInputError, match="at least 2 population users"):
        UtilityPrior.from_population(population[:1])
    with pytest.raises(InvalidInputError, match="prior over 2 attributes, found one over 3"):
        fit_attribute_utilities(picks[:, :2], l2=1.0, prior=prior)


def test_the_embedded_model_ships_a_start_for_per_user_preferences():
    start = start_from(PreferenceConfig(init_from="tiny"))
    # The shapes world's judge reads the colours and backgrounds of the world; the branch and the prior come along.
    assert (
        start.init_reader == "judge" and "red" in start.init_attributes and "dotted background" in start.init_attributes
    )
    assert start.branch == start.init_prior == str(SHIPPED_STARTS["tiny"])
    assert load_branch(start.branch).tensors
    # It says when in denoising each of its attributes acts (measured by bench/calibrate_preference.py).
    windows = load_branch(start.branch).metadata.config[WINDOWS_KEY]
    assert set(windows) == set(start.init_attributes)
    assert all(0.0 <= low < high <= 1.0 for low, high in windows.values())
    # Size is guided, not drawn with tokens: tiny's branch cannot draw a size.
    assert start.guided_attributes == ("large/small",) and start.guided_scale == 0.85
    with pytest.raises(InvalidInputError, match="found no file"):
        start_from(PreferenceConfig(init_from="nowhere.safetensors"))


@pytest.mark.skipif(not (tiny_model_path() / "model_index.json").is_file(), reason="embedded tiny model not built")
def test_per_user_training_on_the_embedded_model_starts_from_its_shipped_start_by_default():
    from studio.base_models import load_base_model

    tiny = load_base_model("tiny")
    default = resolve_start(PreferenceConfig(), tiny)
    # The start alone, no DPO step: what measured best on tiny.
    assert default.init_from == "tiny" and default.branch == str(SHIPPED_STARTS["tiny"]) and default.steps == 0
    assert resolve_start(PreferenceConfig(steps=50), tiny).steps == 50  # DPO from the start, when asked
    plain = resolve_start(PreferenceConfig(init_from="none"), tiny)
    assert (plain.init_from, plain.init_attributes, plain.steps) == ("", (), DEFAULT_STEPS)
    by_key = resolve_start(PreferenceConfig(init_attributes=("red",)), tiny)
    assert by_key.init_from == "" and by_key.init_attributes == ("red",) and by_key.branch == ""
    # Another base model (here a random one) has no shipped start: zero tokens and DPO, or a clear error for steps=0.
    other = tiny_base()
    assert resolve_start(PreferenceConfig(), other).init_from == ""
    with pytest.raises(InvalidInputError, match="steps=0 keeps the start alone, but no start is configured"):
        resolve_start(PreferenceConfig(steps=0), other)


@pytest.mark.skipif(not (tiny_model_path() / "model_index.json").is_file(), reason="embedded tiny model not built")
def test_a_user_trained_on_the_shipped_start_acts_in_its_measured_windows():
    from studio.base_models import load_base_model
    from studio.world.scene import ObjectSpec, Scene, render

    def picture(colour: str, shape: str, size: str = "medium") -> Image.Image:
        return render(Scene("white", (ObjectSpec(shape, colour, size),)))

    tiny = load_base_model("tiny")
    shapes = ("circle", "square", "star", "cross", "ring", "circle")
    pairs = [PreferencePair("erin", f"a {s}", picture("red", s), picture("blue", s)) for s in shapes]
    adapter = train_user_preference(PreferenceConfig(), pairs, tiny)
    config = adapter.metadata.config
    table = load_branch(SHIPPED_STARTS["tiny"]).metadata.config[WINDOWS_KEY]
    assert "red" in config["attribute_groups"]
    assert config["attribute_timesteps"] == [table[a] for a in config["attribute_groups"]]
    assert "prompt_words" not in config, "the objects were all of one size: nothing says which size Erin likes"
    # Finn picks the larger object of the same colour and shape: he is guided towards large.
    colours = ("red", "blue", "green", "yellow", "purple", "orange")
    larger = [
        PreferencePair("finn", f"a {s}", picture(c, s, "large"), picture(c, s, "small"))
        for s, c in zip(shapes, colours, strict=True)
    ]
    config = train_user_preference(PreferenceConfig(), larger, tiny).metadata.config
    assert config["prompt_words"] == ["large"]


def test_the_reader_start_takes_its_prior_from_an_attribute_population(tmp_path):
    base = tiny_base()
    branch = one_step_branch(tmp_path, base)
    candidates = ("red", "blue", "green")
    # Every population user likes red and dislikes blue, or the other way round.
    population_pairs = [
        PreferencePair(f"user{n}", f"a shape {i}", Image.new("RGB", (64, 64), a), Image.new("RGB", (64, 64), b))
        for n in range(4)
        for i, (a, b) in enumerate(
            [("red", "blue"), ("red", "green"), ("green", "blue")]
            if n % 2
            else [("blue", "red"), ("blue", "green"), ("green", "red")]
        )
    ]
    common = {"init_attributes": candidates, "init_reader": "colour", "branch": str(branch)}
    population = train_population(
        PreferenceConfig(mode="population", population_encoder="attributes", context_pairs=2, **common),
        population_pairs,
        base,
        attribute_reader=ColourReader(),
    )
    prior = write(tmp_path, "population", population)
    # Carol's one pick, green over blue, is read through the population: blue haters like red.
    pairs = [
        PreferencePair("carol", "a shape", Image.new("RGB", (64, 64), "green"), Image.new("RGB", (64, 64), "blue"))
    ]
    cfg = PreferenceConfig(steps=1, batch_size=1, lr=1e-12, init_prior=str(prior), init_top=1, **common)
    adapter = train_user_preference(cfg, pairs * 2, base, attribute_reader=ColourReader())
    assert adapter.metadata.config["initial_attributes"] == ["red"]
    # init_from spells out the same start from the population file alone (candidates, reader, branch, prior), and
    # steps=0 keeps the start as it is (no DPO step).
    same = load_config(PreferenceConfig, overrides=[f"init_from={prior}", "steps=0", "init_top=1"])
    adapter = train_user_preference(same, pairs * 2, base, attribute_reader=ColourReader())
    config = adapter.metadata.config
    assert config["initial_attributes"] == ["red"] and config["training"]["init_prior"] == str(prior)
    assert config["final_loss"] is None
    assert torch.equal(adapter.tensors[TOKENS_KEY], phrase_tokens(base.pipeline, "red", 4, torch.device("cpu")))
    with pytest.raises(InvalidInputError, match="'steps' expects a positive int, got '0'"):
        load_config(PreferenceConfig, overrides=["steps=0", "init_from=none"])
    # An attributes population runs no DPO loop either.
    keys = ["mode=population", "population_encoder=attributes", "init_reader=colour", "init_attributes=red"]
    assert load_config(PreferenceConfig, overrides=[*keys, f"branch={branch}", "steps=0"]).steps == 0
    other = PreferenceConfig(steps=1, init_prior=str(prior), **{**common, "init_attributes": ("red", "blue")})
    with pytest.raises(InvalidInputError, match="same candidates"):
        train_user_preference(other, pairs * 2, base, attribute_reader=ColourReader())
    with pytest.raises(InvalidInputError, match="'init_prior' expects 'init_reader'"):
        load_config(PreferenceConfig, overrides=[f"init_prior={prior}"])


@pytest.fixture
def service(tmp_path):
    write(tmp_path, "alice", user_adapter("alice", seed=1))
    write(tmp_path, "bob", user_adapter("bob", seed=2))
    alice, bob = (user_adapter(u, seed=s) for u, s in (("alice", 1), ("bob", 2)))
    write(tmp_path, "mix0", interpolate_preferences(alice, bob, 0.0))
    write(tmp_path, "mix1", interpolate_preferences(alice, bob, 1.0))
    write(tmp_path, "mixhalf", interpolate_preferences(alice, bob, 0.5))
    write(tmp_path, "taste", attribute_preference(["blue", "large"], ["red", "small"], family="sd1"))
    write(tmp_path, "liked", attribute_preference(["large"], [], family="sd1"))
    write(tmp_path, "conflict", attribute_preference(["blue", "striped background"], ["red"], family="sd1"))
    write(tmp_path, "nothing", attribute_preference([], [], family="sd1"))
    service = PipelineService(tiny_base(), adapter_source=tmp_path)
    yield service
    service.close()


def generate(service: PipelineService, *adapters: str | AdapterRef) -> np.ndarray:
    refs = [a if isinstance(a, AdapterRef) else AdapterRef.parse(a) for a in adapters]
    request = GenerationRequest(prompt=PROMPT, seeds=[1], steps=STEPS, width=64, height=64, adapters=refs)
    return pixels(service.generate(request).images[0])


def test_user_preference_strength_and_interpolation(service):
    stock = generate(service)
    alice = generate(service, "alice")
    assert np.abs(alice - stock).max() > 0, "a user embedding changes the image"
    assert np.array_equal(generate(service, "alice:strength=0"), stock), "strength 0 is the base model, bit for bit"
    assert np.array_equal(generate(service, "alice:0"), stock)
    assert np.array_equal(generate(service), stock), "no adapter after one: the base model again"

    assert np.array_equal(generate(service, "mix0"), alice)
    assert np.array_equal(generate(service, "mix1"), generate(service, "bob"))
    half = generate(service, "mixhalf")
    assert not np.array_equal(half, alice)

    with pytest.raises(InvalidInputError, match="strength"):
        generate(service, "alice:streng=2")


def test_attribute_guidance(service, tiny_sd1_pipe):
    stock = generate(service)
    assert np.array_equal(generate(service, "nothing"), stock), "empty attribute lists are normal guidance"

    calls = []
    hook = service.pipeline.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    taste = generate(service, "taste")
    hook.remove()
    assert len(calls) == 2 * STEPS, "one extra U-Net evaluation per step"
    assert np.abs(taste - stock).max() > 0
    assert np.array_equal(generate(service, "taste:attribute_scale=0"), stock)

    # Attributes about what the prompt names ("a red circle": its subject's colour) are left out for that prompt;
    # one about what it leaves open (the background) stays.
    assert not np.array_equal(generate(service, "conflict"), stock)
    named = GenerationRequest(prompt=PROMPT + " on a white background", seeds=[1], steps=STEPS, width=64, height=64)
    with_conflict = replace(named, adapters=[AdapterRef.parse("conflict")])
    assert np.array_equal(pixels(service.generate(with_conflict).images[0]), pixels(service.generate(named).images[0]))

    # Liked attributes only: exactly the stock pipeline with s * E(liked) added to the prompt's states.
    pipe = tiny_sd1_pipe
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0] + 0.85 * pipe.encode_prompt("large", "cpu", 1, False)[0]
    output = pipe(
        prompt_embeds=embeds,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(1),
    )
    assert np.abs(generate(service, "liked") - pixels(output.images[0])).max() <= 1


def test_a_user_guided_on_a_size_gets_its_word_in_the_prompt(service, tmp_path):
    guided = user_adapter("gil", seed=1)
    guided.metadata.config.update(prompt_words=["large"])
    write(tmp_path, "gil", guided)
    plain = user_adapter("gil", seed=1)
    write(tmp_path, "plain", plain)  # the same tokens, nothing guided

    def image(prompt: str, *names: str) -> np.ndarray:
        refs = [AdapterRef.parse(n) for n in names]
        request = GenerationRequest(prompt=prompt, seeds=[1], steps=STEPS, width=64, height=64, adapters=refs)
        return pixels(service.generate(request).images[0])

    # Exactly the tokens on the prompt with the size written in, and the tokens still read the prompt as written.
    assert np.array_equal(image("a red circle", "gil"), image("a large red circle", "plain"))
    assert not np.array_equal(image("a red circle", "gil"), image("a red circle", "plain"))
    # A prompt that names a size keeps its own; strength 0 is the base model; attribute_scale=0 the tokens alone.
    assert np.array_equal(image("a small red circle", "gil"), image("a small red circle", "plain"))
    assert np.array_equal(image("a red circle", "gil:strength=0"), image("a red circle"))
    assert np.array_equal(image("a red circle", "gil:attribute_scale=0"), image("a red circle", "plain"))


def test_a_user_file_with_liked_attributes_adds_vipers_term_to_its_tokens(service, tmp_path):
    guided = user_adapter("erin", seed=1)
    guided.metadata.config.update(liked=["large"], disliked=["small"], attribute_scale=0.85)
    write(tmp_path, "erin", guided)
    alice = generate(service, "alice")  # the same tokens, nothing guided
    context = next(
        p.context for p in service.pipeline.unet.attn_processors.values() if isinstance(p, ConditionedAttnProcessor)
    )
    seen: list[tuple[int, bool]] = []
    hook = service.pipeline.unet.register_forward_pre_hook(
        lambda _, args: seen.append((args[0].shape[0], context.state is not None))
    )
    erin = generate(service, "erin")
    hook.remove()
    assert np.abs(erin - alice).max() > 0, "the guided size changes the image the tokens alone draw"
    # One extra U-Net evaluation per step, for the unconditional prediction, and no conditioning in it: the user's
    # tokens act on the prompt's rows only.
    assert seen == [(2, True), (1, False)] * STEPS
    assert np.array_equal(generate(service, "erin:strength=0"), generate(service)), "strength 0: the base model"
    assert np.array_equal(generate(service, "erin:attribute_scale=0"), alice), "no guidance: the tokens alone"
    # A prompt that names the size leaves the guided size out.
    named = GenerationRequest(prompt="a large red circle", seeds=[1], steps=STEPS, width=64, height=64)
    image = lambda name: pixels(service.generate(replace(named, adapters=[AdapterRef(name)])).images[0])  # noqa: E731
    assert np.array_equal(image("erin"), image("alice"))


def test_attribute_token_groups_yield_to_the_prompts_words(tmp_path):
    tokens = torch.randn(8, 32, generator=torch.Generator().manual_seed(3)) * 3.0
    config = {"mode": "user", "user_id": "dana", "attribute_groups": ["black background", "red"]}
    meta = AdapterMetadata(kind="preference", family="sd1", config={**config, "tokens_per_attribute": 4})
    write(tmp_path, "grouped", AdapterFile({TOKENS_KEY: tokens}, meta))
    write(tmp_path, "plain", user_adapter("dana", seed=3))
    red = {**config, "attribute_groups": ["red"], "attribute_nouns": ["background"], "tokens_per_attribute": 4}
    write(
        tmp_path,
        "red-only",
        AdapterFile({TOKENS_KEY: tokens[4:]}, AdapterMetadata(kind="preference", family="sd1", config=red)),
    )
    service = PipelineService(tiny_base(), adapter_source=tmp_path)
    try:

        def image(prompt: str, adapter: str | None) -> np.ndarray:
            refs = [AdapterRef.parse(adapter)] if adapter else []
            request = GenerationRequest(prompt=prompt, seeds=[1], steps=STEPS, width=64, height=64, adapters=refs)
            return pixels(service.generate(request).images[0])

        # "a red circle on a white background" decides both: the branch reads only zero tokens, adding nothing.
        decided = "a red circle on a white background"
        assert np.array_equal(image(decided, "grouped"), image(decided, None))
        assert np.abs(image("a circle", "grouped") - image("a circle", None)).max() > 0
        # Each group attends on its own: with the background decided, "red" acts exactly as it does alone, not at
        # the share of the attention its zeroed neighbour would leave it.
        background_named = "a circle on a white background"
        assert np.array_equal(image(background_named, "grouped"), image(background_named, "red-only"))
    finally:
        service.close()
    bad = AdapterMetadata(kind="preference", family="sd1", config={**config, "tokens_per_attribute": 3})
    write(tmp_path, "bad", AdapterFile({TOKENS_KEY: tokens}, bad))
    service = PipelineService(tiny_base(), adapter_source=tmp_path)
    try:
        with pytest.raises(InvalidInputError, match="attribute groups"):
            service.generate(GenerationRequest(prompt=PROMPT, seeds=[1], steps=STEPS, adapters=[AdapterRef("bad")]))
    finally:
        service.close()


def test_an_attribute_group_acts_only_in_its_timestep_window(tmp_path):
    tokens = torch.randn(8, 32, generator=torch.Generator().manual_seed(3)) * 3.0
    base = {"mode": "user", "user_id": "dana", "attribute_groups": ["black background", "red"]}
    base |= {"attribute_nouns": ["background"], "tokens_per_attribute": 4}

    def adapter(name: str, **config: object) -> None:
        meta = AdapterMetadata(kind="preference", family="sd1", config={**base, **config})
        write(tmp_path, name, AdapterFile({TOKENS_KEY: tokens}, meta))

    adapter("always")
    adapter("whole-schedule", attribute_timesteps=[[0.0, 1.0], [0.0, 1.0]])
    adapter("never", attribute_timesteps=[[0.0, 0.0], [1.0, 1.0]])  # no sampling step is at exactly t = 0 or 1000
    adapter("red-late", attribute_timesteps=[[0.0, 1.0], [0.0, 0.5]])
    adapter("bad", attribute_timesteps=[[0.0, 1.5], [0.0, 1.0]])
    service = PipelineService(tiny_base(), adapter_source=tmp_path)
    try:

        def image(adapter: str | None) -> np.ndarray:
            refs = [AdapterRef.parse(adapter)] if adapter else []
            request = GenerationRequest(prompt="a circle", seeds=[1], steps=STEPS, width=64, height=64, adapters=refs)
            return pixels(service.generate(request).images[0])

        plain, always = image(None), image("always")
        assert np.array_equal(image("whole-schedule"), always)
        assert np.array_equal(image("never"), plain)
        late = image("red-late")
        assert not np.array_equal(late, always) and not np.array_equal(late, plain)
        with pytest.raises(InvalidInputError, match="low <= high <= 1"):
            image("bad")
    finally:
        service.close()


def test_attribute_guidance_combination_is_vipers_formula():
    eps_u, eps_p, eps_n = torch.randn(3, 2, 4, 8, 8).unbind(0)
    uncond, text = combine_attribute_guidance(eps_u, eps_p, eps_n).chunk(2)
    w = 7.5
    torch.testing.assert_close(uncond + w * (text - uncond), eps_u + w * (eps_p - eps_n))


def test_preference_composes_with_a_lora(service, tmp_path):
    write(tmp_path, "subject", random_lora(service.pipeline, seed=3))
    lora = generate(service, "subject")
    both = generate(service, "subject", "alice")
    assert np.abs(both - lora).max() > 0 and np.abs(both - generate(service, "alice")).max() > 0
    assert np.array_equal(generate(service, "subject", "alice:strength=0"), lora)


def test_population_training_and_a_new_users_embedding():
    base = tiny_base()
    features = JudgeFeatures(JudgeNet())
    pairs = pairs_of("alice", 4) + pairs_of("bob", 4)
    cfg = PreferenceConfig(mode="population", steps=2, batch_size=2, users_per_step=2, context_pairs=2, hidden=16)
    model = train_population(cfg, pairs, base, image_features=features)
    assert model.metadata.config["mode"] == "population" and model.metadata.config["image_encoder"] == "judge"
    assert any(k.startswith("preference.encoder.") for k in model.tensors)
    assert TOKENS_KEY not in model.tensors
    assert not any(isinstance(p, ConditionedAttnProcessor) for p in base.pipeline.unet.attn_processors.values())

    user = embed_user(model, pairs_of("carol", 4), image_features=features)
    assert user.metadata.config["mode"] == "user" and user.metadata.config["user_id"] == "carol"
    assert user.tensors[TOKENS_KEY].shape == (4, 32) and user.tensors[TOKENS_KEY].abs().sum() > 0
    layers = [k for k in user.tensors if k.startswith("preference.layers.")]
    assert layers and all(torch.equal(user.tensors[k], model.tensors[k]) for k in layers)

    class OtherFeatures(JudgeFeatures):
        name = "clip:/elsewhere"

    with pytest.raises(InvalidInputError, match="reads images through"):
        embed_user(model, pairs_of("carol", 4), image_features=OtherFeatures(JudgeNet()))
    with pytest.raises(NotAvailableError, match="CLIP vision model"):
        ClipVisionFeatures(None)


def test_the_cli_says_a_branch_is_not_trained_from_pairs(tmp_path):
    from argparse import Namespace

    from trainers.preference import train_from_cli

    args = Namespace(resume=None, pairs=str(tmp_path / "picks.jsonl"), config=None, set=["mode=branch"], name="b")
    with pytest.raises(NotAvailableError, match="not available yet"):
        train_from_cli(args, home=None)


def test_the_cli_embeds_a_new_user_with_the_population_shipped_for_tiny(tmp_path):
    import json
    from argparse import Namespace

    from studio.home import StudioHome
    from studio.library import AdapterLibrary
    from studio.world.scene import ObjectSpec, Scene, render
    from trainers.preference import train_from_cli

    # Four picks of someone who takes the red object on the dotted background each time.
    rows = []
    for i, shape in enumerate(["circle", "square", "triangle", "star"]):
        liked = render(Scene("dots", (ObjectSpec(shape, "red"),)))
        other = render(Scene("white", (ObjectSpec(shape, "blue"),)))
        liked.save(tmp_path / f"{i}a.png")
        other.save(tmp_path / f"{i}b.png")
        rows.append({"user_id": "dana", "caption": f"a {shape}", "jpg_0": f"{i}a.png", "jpg_1": f"{i}b.png",
                     "label_0": 1, "label_1": 0})  # fmt: skip
    picks = tmp_path / "picks.jsonl"
    picks.write_text("".join(json.dumps(row) + "\n" for row in rows))
    home = StudioHome(tmp_path / "home")
    args = Namespace(
        resume=None,
        pairs=str(picks),
        user="dana",
        config=None,
        set=["mode=embed", "population_model=tiny"],
        name="dana-taste",
        base="tiny",
    )
    assert train_from_cli(args, home) == 0
    config = AdapterLibrary(home).load("dana-taste").metadata.config
    assert config["mode"] == "user" and config["user_id"] == "dana" and config["pairs"] == 4
    assert "red" in config["initial_attributes"] or "dotted background" in config["initial_attributes"]
    # A name that is neither in the library nor shipped is a one-line error naming it.
    args.set, args.name = ["mode=embed", "population_model=nobody"], "other"
    with pytest.raises(StudioError, match="no adapter named 'nobody'"):
        train_from_cli(args, home)

"""Latent regions: one U-Net view per region, each with its own prompt and, when given one, its own LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig
from test_pipeline_helpers import pixels, random_embedding, random_lora, tiny_base, write

from pipelines.latent_regions import LatentRegions, region_views
from pipelines.requests import AdapterRef, GenerationRequest
from pipelines.service import PipelineService
from studio.errors import InvalidInputError, NotAvailableError
from studio.testing import build_tiny_sd1_pipeline, tiny_model_path

PROMPT = "a red circle BREAK a blue square"


def test_views_cover_the_latent_without_gaps_and_overlap_only_when_narrow():
    wide = region_views("columns", 3, height=16, width=48, native=16)
    assert [(v.left, v.width, v.height) for v in wide] == [(0, 16, 16), (16, 16, 16), (32, 16, 16)]
    narrow = region_views("columns", 2, height=16, width=28, native=16)
    assert [(v.left, v.width) for v in narrow] == [(0, 16), (12, 16)]  # 4 columns shared
    rows = region_views("rows", 2, height=40, width=16, native=16)
    assert [(v.top, v.height, v.width) for v in rows] == [(0, 20, 16), (20, 20, 16)]  # at least its share
    small = region_views("columns", 2, height=8, width=8, native=16)
    assert [(v.left, v.width) for v in small] == [(0, 8), (0, 8)]  # never wider than the image


def _unet_inputs(unet: torch.nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    side = int(unet.config.sample_size)
    sample = torch.randn(2, unet.config.in_channels, side, width, generator=generator)
    dim = int(unet.config.cross_attention_dim)
    negative_and_first = torch.randn(2, 5, dim, generator=generator)
    second = torch.randn(1, 5, dim, generator=generator)
    return sample, negative_and_first, [negative_and_first[1:], second]


def test_each_view_gets_exactly_its_prompt_and_its_lora():
    """Stitched predictions equal direct U-Net calls on each window, with that region's states and LoRA only."""
    unet = build_tiny_sd1_pipeline(seed=0).unet
    side = int(unet.config.sample_size)
    sample, hidden, parts = _unet_inputs(unet, 2 * side)
    views = region_views("columns", 2, height=side, width=2 * side, native=side)
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False), "style")
    t = torch.tensor(500)

    def direct(view_index: int, lora: bool) -> torch.Tensor:
        states = torch.cat([hidden[:1], parts[view_index]])
        unet.enable_adapters() if lora else unet.disable_adapters()
        try:
            return unet(views[view_index].cut(sample), t, encoder_hidden_states=states).sample
        finally:
            unet.enable_adapters()

    with torch.no_grad():
        expected = [direct(0, lora=False), direct(1, lora=True)]
        with LatentRegions(unet, views, parts, guided=True, lora_names=[None, "style"]):
            stitched = unet(sample, t, encoder_hidden_states=hidden).sample
        after = unet(sample[:, :, :, :side], t, encoder_hidden_states=hidden).sample
    assert stitched.shape == sample.shape
    assert torch.allclose(views[0].cut(stitched), expected[0], atol=1e-5)
    assert torch.allclose(views[1].cut(stitched), expected[1], atol=1e-5)
    assert not torch.allclose(expected[1], direct(1, lora=False), atol=1e-3), "the LoRA should change the view"
    # The hooks are gone afterwards: a plain call is a plain call (with the LoRA active everywhere again).
    with torch.no_grad():
        plain = unet(sample[:, :, :, :side], t, encoder_hidden_states=hidden).sample
    assert torch.equal(after, plain)


def test_overlapping_views_average_their_predictions():
    unet = build_tiny_sd1_pipeline(seed=0).unet
    side = int(unet.config.sample_size)
    sample, hidden, parts = _unet_inputs(unet, side + side // 2)
    views = region_views("columns", 2, height=side, width=side + side // 2, native=side)
    t = torch.tensor(300)
    with torch.no_grad():
        one, two = (
            unet(view.cut(sample), t, encoder_hidden_states=torch.cat([hidden[:1], part])).sample
            for view, part in zip(views, parts, strict=True)
        )
        with LatentRegions(unet, views, parts, guided=True):
            stitched = unet(sample, t, encoder_hidden_states=hidden).sample
    shared = slice(views[1].left, views[0].width)
    assert torch.allclose(stitched[..., : views[1].left], one[..., : views[1].left], atol=1e-5)
    assert torch.allclose(
        stitched[..., shared], (one[..., views[1].left :] + two[..., : -views[1].left]) / 2, atol=1e-5
    )
    assert torch.allclose(stitched[..., views[0].width :], two[..., views[0].width - views[1].left :], atol=1e-5)


@pytest.fixture
def service(tmp_path) -> PipelineService:
    base = tiny_base()
    write(tmp_path, "style", random_lora(base.pipeline, seed=1))
    write(tmp_path, "other", random_lora(base.pipeline, seed=2))
    write(tmp_path, "text", random_lora(base.pipeline, seed=3, text_encoder=True))
    write(tmp_path, "token", random_embedding(seed=4))
    return PipelineService(base, "cpu", adapter_source=tmp_path)


def _latent(prompt: str = PROMPT, adapters: tuple[str, ...] = (), **changes) -> GenerationRequest:
    values = {"seeds": [3], "steps": 2, "width": 64, "height": 32, "regions": "columns", "region_mode": "latent"}
    return GenerationRequest(prompt=prompt, adapters=[AdapterRef.parse(a) for a in adapters], **{**values, **changes})


def test_a_lora_given_a_region_changes_the_image_differently_and_leaves_no_trace(service):
    plain = pixels(service.generate(_latent()).images[0])
    everywhere = pixels(service.generate(_latent(adapters=("style",))).images[0])
    first = pixels(service.generate(_latent(adapters=("style:1,region=1",))).images[0])
    second = pixels(service.generate(_latent(adapters=("style:1,region=2",))).images[0])
    for image in (everywhere, first, second):
        assert np.abs(image.astype(int) - plain).max() > 0
    assert np.abs(first.astype(int) - second).max() > 0
    assert np.abs(first.astype(int) - everywhere).max() > 0
    # One LoRA per region, and a region without one, in the same request.
    both = service.generate(_latent(adapters=("style:1,region=1", "other:0.5,region=2")))
    assert both.images[0].size == (64, 32)
    # The next request without regions is the stock image again: hooks and LoRA rows are gone.
    stock = GenerationRequest(prompt="a red circle", seeds=[3], steps=2, width=32, height=32)
    before = pixels(PipelineService(tiny_base(), "cpu").generate(stock).images[0])
    assert np.array_equal(pixels(service.generate(stock).images[0]), before)


@pytest.mark.parametrize(
    ("request_changes", "error", "message"),
    [
        ({"adapters": ("style:1,region=2",), "region_mode": "attention"}, InvalidInputError, "needs latent regions"),
        ({"adapters": ("style:1,region=3",)}, InvalidInputError, "from 1 to 2"),
        ({"adapters": ("style:1,region=1.5",)}, InvalidInputError, "from 1 to 2"),
        ({"prompt": "a scene ADDBASE a BREAK b"}, InvalidInputError, "no ADDBASE base part"),
        ({"region_mode": "pixels"}, InvalidInputError, "region_mode should be one of attention, latent"),
        ({"adapters": ("token:1,region=1",)}, InvalidInputError, "the option region is for LoRA adapters"),
        ({"adapters": ("style:1,region=1", "other")}, NotAvailableError, "more than one LoRA in one region"),
        ({"adapters": ("text:1,region=1",)}, NotAvailableError, "also changes the text encoder"),
    ],
)
def test_bad_latent_region_requests_get_one_line_errors(service, request_changes, error, message):
    changes = dict(request_changes)
    request = _latent(changes.pop("prompt", PROMPT), changes.pop("adapters", ()), **changes)
    with pytest.raises(error, match=message) as caught:
        service.generate(request)
    assert "\n" not in str(caught.value)
    # The service is still usable after the refusal.
    assert service.generate(_latent()).images[0].size == (64, 32)


@pytest.mark.skipif(not (tiny_model_path() / "model_index.json").is_file(), reason="embedded tiny model not built")
def test_the_embedded_model_draws_one_subject_per_latent_region():
    from studio.base_models import load_base_model

    service = PipelineService(load_base_model("tiny"), "cpu")
    request = GenerationRequest(
        prompt="a red circle on a blue background BREAK a yellow star on a green background",
        seeds=[1, 2],
        width=2 * service.default_size,
        regions="columns",
        region_mode="latent",
    )
    for image in service.generate(request).images:
        rgb = pixels(image).astype(float)
        left, right = np.split(rgb, 2, axis=1)
        red = (left[..., 0] > 150) & (left[..., 1] < 100) & (left[..., 2] < 100)
        yellow = (right[..., 0] > 150) & (right[..., 1] > 150) & (right[..., 2] < 100)
        assert red.mean() > 0.1, f"the left half should hold the red circle, {red.mean():.0%} of it is red"
        assert yellow.mean() > 0.1, f"the right half should hold the yellow star, {yellow.mean():.0%} is yellow"
        assert left[..., 2].mean() > left[..., 1].mean() and right[..., 1].mean() > right[..., 2].mean()


def test_latent_regions_on_sdxl_change_only_the_view_whose_part_changed():
    """SDXL: two encoders' states and a pooled embedding and size ids per view; each view reads only its own part."""
    from studio.base_models import BaseModel
    from studio.testing import build_tiny_sdxl_pipeline

    service = PipelineService(BaseModel.from_pipeline(build_tiny_sdxl_pipeline(seed=0), "tiny-xl"), "cpu")
    side = service.default_size
    request = GenerationRequest(
        prompt="a red circle BREAK a red circle", seeds=[1], steps=2, width=2 * side, height=side, regions="columns"
    )
    request.region_mode = "latent"
    same = pixels(service.generate(request).images[0])
    request.prompt = "a red circle BREAK a blue square"
    other = pixels(service.generate(request).images[0])
    assert same.shape == (side, 2 * side, 3)
    change = np.abs(same.astype(int) - other)
    # Only the second view's words changed: its half changes far more than the first view's (the VAE's decoder
    # still mixes the halves a little).
    assert change[:, side:].mean() > 3 * change[:, :side].mean(), (change[:, :side].mean(), change[:, side:].mean())

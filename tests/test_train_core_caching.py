"""Latent and text-embedding caches: computed once, deterministic, recomputed when the image or caption changes."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from trainers.core.caching import TensorCache, cache_latents, cache_text_embeddings, content_key, encode_latents


def _vae(seed: int = 0, **kwargs: float) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **kwargs,
    ).eval()


class CountingVae(torch.nn.Module):
    """Wraps a VAE and counts the images it encodes."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae
        self.config = vae.config
        self.encoded = 0

    def encode(self, pixels: torch.Tensor):  # noqa: ANN201
        self.encoded += pixels.shape[0]
        return self.vae.encode(pixels)


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in [(32, 32), (32, 32), (16, 32)]]


def test_latents_are_deterministic_scaled_and_computed_once(tmp_path: Path) -> None:
    vae = CountingVae(_vae())
    images = _images()
    cache = TensorCache(tmp_path / "latents", kind="latents")
    first = cache_latents(vae, images, cache=cache, model_key="tiny", batch_size=4)
    assert vae.encoded == 3
    assert [tuple(t.shape) for t in first] == [(4, 16, 16), (4, 16, 16), (4, 8, 16)]
    mean = vae.vae.encode(images[0][None].float() / 127.5 - 1).latent_dist.mean[0]
    assert torch.allclose(first[0], mean * vae.config.scaling_factor, atol=1e-5)

    again = cache_latents(vae, images, cache=cache, model_key="tiny")
    assert vae.encoded == 3  # nothing recomputed
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))

    # A new process (new in-memory cache) reads the disk cache; a changed image or model is recomputed.
    disk = TensorCache(tmp_path / "latents", kind="latents")
    changed = [images[0], images[1].clone(), images[2]]
    changed[1][0, 0, 0] ^= 1
    cache_latents(vae, changed, cache=disk, model_key="tiny")
    assert vae.encoded == 4 and disk.hits == 2
    cache_latents(vae, changed, cache=disk, model_key="other-base-model")
    assert vae.encoded == 7


def test_sampled_latents_do_not_depend_on_batching() -> None:
    vae = _vae()
    images = _images()[:2]
    one_by_one = cache_latents(vae, images, cache=TensorCache(), model_key="m", batch_size=1, sample_seed=3)
    batched = cache_latents(vae, images, cache=TensorCache(), model_key="m", batch_size=2, sample_seed=3)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(one_by_one, batched, strict=True))
    means = cache_latents(vae, images, cache=TensorCache(), model_key="m")
    assert not torch.allclose(one_by_one[0], means[0])


def test_shift_factor_is_applied() -> None:
    plain, shifted = _vae(seed=1), _vae(seed=1, shift_factor=0.5, scaling_factor=2.0)
    pixels = torch.zeros(1, 3, 32, 32)
    z = plain.encode(pixels).latent_dist.mean
    assert torch.allclose(encode_latents(shifted, pixels), (z - 0.5) * 2.0, atol=1e-5)


def test_text_embeddings_once_per_distinct_caption(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        calls.append(captions)
        codes = torch.tensor([[float(len(c)), float(ord(c[-1]))] for c in captions])
        return {"prompt_embeds": codes[:, None, :].repeat(1, 3, 1), "pooled_prompt_embeds": codes}

    captions = ["a photo of sks", "a photo of sks", "a dog", "a photo of sks dog"]
    cache = TensorCache(tmp_path / "text", kind="text")
    out = cache_text_embeddings(encode, captions, cache=cache, model_key="tiny", batch_size=2)
    assert sorted(out) == sorted(set(captions))
    assert [len(c) for c in calls] == [2, 1]  # 3 distinct captions, batches of 2
    assert out["a dog"]["prompt_embeds"].shape == (3, 2) and out["a dog"]["pooled_prompt_embeds"][0] == 5.0
    cache_text_embeddings(encode, ["a dog", "a cat"], cache=TensorCache(tmp_path / "text"), model_key="tiny")
    assert calls[-1] == ["a cat"]  # only the new caption, even from a fresh in-memory cache


def test_content_key_tells_tensors_apart() -> None:
    a = torch.zeros(2, 2)
    assert content_key("x", a) == content_key("x", a.clone())
    assert content_key("x", a) != content_key("x", a.double())
    assert content_key("x", a) != content_key("x", a.reshape(4))
    assert content_key("ab", "c") != content_key("a", "bc")

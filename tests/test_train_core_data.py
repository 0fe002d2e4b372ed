"""Image folders as users bring them: odd colour modes, rotated phone photos, broken files, bombs, captions, buckets."""

from __future__ import annotations

import logging
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import InvalidInputError
from trainers.core.data import (
    BucketBatchSampler,
    ImageFolderDataset,
    collate_examples,
    load_image_rgb,
    make_buckets,
    repeat_batches,
)


def _rgb_at(path: Path, xy: tuple[int, int]) -> tuple[int, int, int]:
    return load_image_rgb(path).getpixel(xy)


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def test_grayscale_and_16_bit_become_gray_rgb(tmp_path: Path) -> None:
    Image.new("L", (16, 16), 100).save(tmp_path / "gray.png")
    deep = Image.fromarray(np.full((16, 16), 200 * 257, dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really a 16-bit file
    assert load_image_rgb(tmp_path / "gray.png").mode == "RGB"
    assert _rgb_at(tmp_path / "gray.png", (3, 3)) == (100, 100, 100)
    # 16-bit samples are rescaled (200 * 257 -> 200), not clipped to white.
    assert _rgb_at(tmp_path / "deep.png", (3, 3)) == (200, 200, 200)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert _close(_rgb_at(tmp_path / "cmyk.jpg", (8, 8)), (255, 0, 0), tol=20)


def test_alpha_and_palette_transparency_are_composited_on_the_background(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 8, 16))  # left half fully transparent (black underneath)
    rgba.save(tmp_path / "cutout.png")
    assert _rgb_at(tmp_path / "cutout.png", (2, 2)) == (255, 255, 255)  # white, not black
    assert _rgb_at(tmp_path / "cutout.png", (12, 2)) == (255, 0, 0)
    assert load_image_rgb(tmp_path / "cutout.png", background=(0, 128, 0)).getpixel((2, 2)) == (0, 128, 0)

    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (8, 0, 16, 16))
    palette.save(tmp_path / "palette.png", transparency=0)
    assert _rgb_at(tmp_path / "palette.png", (2, 2)) == (255, 255, 255)
    assert _rgb_at(tmp_path / "palette.png", (12, 2)) == (0, 0, 255)

    gray_alpha = Image.new("LA", (8, 8), (50, 0))
    gray_alpha.save(tmp_path / "la.png")
    assert _rgb_at(tmp_path / "la.png", (1, 1)) == (255, 255, 255)


def test_exif_rotated_photo_is_upright(tmp_path: Path) -> None:
    # Stored sideways: 40 wide, 20 high, left half red, right half blue; orientation 6 = "rotate 90 CW to view".
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    upright = load_image_rgb(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)
    assert _close(upright.getpixel((10, 5)), (255, 0, 0), tol=30)  # the stored left side is now on top
    assert _close(upright.getpixel((10, 35)), (0, 0, 255), tol=30)


def _truncated_jpeg(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bomb_png(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A tiny PNG whose header claims width x height (IHDR patched, CRC fixed): cheap to make, huge to decode."""
    Image.new("L", (1, 1), 0).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_truncated_jpeg_is_refused_clearly(tmp_path: Path) -> None:
    _truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(InvalidInputError, match=r"cut\.jpg could not be decoded \(truncated"):
        load_image_rgb(tmp_path / "cut.jpg")


def test_decompression_bomb_is_refused_fast(tmp_path: Path) -> None:
    _bomb_png(tmp_path / "bomb.png")
    start = time.monotonic()
    with pytest.raises(InvalidInputError, match=r"bomb\.png.*decompression bomb"):
        load_image_rgb(tmp_path / "bomb.png")
    assert time.monotonic() - start < 2.0
    # Our own limit is checked from the header too (no decoding), with the size in the message.
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(InvalidInputError, match=r"big\.png is 100x100 .*decompression bomb"):
        load_image_rgb(tmp_path / "big.png", max_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's global is left alone


def test_folder_skips_bad_files_with_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "good.png")
    _truncated_jpeg(tmp_path / "cut.jpg")
    _bomb_png(tmp_path / "bomb.png")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4 not a picture")
    (tmp_path / "fake.png").write_text("this is text with a .png name")
    with caplog.at_level(logging.WARNING):
        dataset = ImageFolderDataset(tmp_path, resolution=64, bucket_step=8)
    assert [p.name for p in dataset.paths] == ["good.png"]
    logged = caplog.text
    for name in ("cut.jpg", "bomb.png", "notes.pdf", "fake.png"):
        assert name in logged


def test_folder_with_nothing_usable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(
        InvalidInputError, match=r"no images found in .* \(looked for \.png, \.jpg, \.jpeg, \.webp, \.bmp\)"
    ):
        ImageFolderDataset(tmp_path, resolution=64, bucket_step=8)
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(InvalidInputError, match="no images found"):
        ImageFolderDataset(tmp_path, resolution=64, bucket_step=8)
    _truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(InvalidInputError, match=r"no usable images .* all 1 failed to load"):
        ImageFolderDataset(tmp_path, resolution=64, bucket_step=8)
    with pytest.raises(InvalidInputError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", resolution=64, bucket_step=8)


def test_captions_masks_and_pixel_range(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of sks toy\non a table\n", encoding="utf-8")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "b.jpg")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "a_mask.png")
    dataset = ImageFolderDataset(tmp_path, resolution=64, bucket_step=8, default_caption="a photo of sks")
    assert len(dataset) == 2  # the mask is not a training image
    a, b = dataset[0], dataset[1]
    assert a.caption == "a photo of sks toy on a table"
    assert b.caption == "a photo of sks"
    assert a.pixels.shape == (3, 64, 64) and a.pixels.dtype == torch.float32
    assert a.pixels[0].min() == 1.0 and a.pixels[1].max() == -1.0  # red in [-1, 1]
    assert b.pixels.min() == -1.0
    assert a.mask is not None and a.mask.shape == (1, 64, 64)
    assert a.mask[0, 10, 5] == 1.0 and a.mask[0, 10, 60] == 0.0
    assert b.mask is None
    batch = collate_examples([a, b])
    assert batch.pixels.shape == (2, 3, 64, 64) and batch.captions[1] == "a photo of sks"
    assert batch.masks is not None and batch.masks[1].min() == 1.0  # no mask: the whole image counts


def test_mask_folder(tmp_path: Path) -> None:
    images, masks = tmp_path / "img", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.new("RGB", (64, 64)).save(images / "x.png")
    Image.new("L", (64, 64), 255).save(masks / "x.png")
    dataset = ImageFolderDataset(images, resolution=64, bucket_step=8, mask_dir=masks)
    assert dataset.has_masks and dataset[0].mask.min() == 1.0


def test_buckets_keep_aspect_ratio_and_square_images_fill_the_resolution(tmp_path: Path) -> None:
    buckets = make_buckets(64, step=8)
    assert (64, 64) in buckets
    assert all(w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64 for w, h in buckets)
    assert all(w * h <= 512 * 512 and w % 64 == 0 for w, h in make_buckets(512))

    Image.new("RGB", (300, 300), (0, 255, 0)).save(tmp_path / "square.png")
    Image.new("RGB", (200, 100), (0, 0, 255)).save(tmp_path / "wide.png")
    Image.new("RGB", (90, 180), (255, 0, 0)).save(tmp_path / "tall.png")
    Image.new("RGB", (250, 250), (0, 255, 0)).save(tmp_path / "square2.png")
    dataset = ImageFolderDataset(tmp_path, resolution=64, bucket_step=8)
    shapes = {p.name: tuple(dataset[i].pixels.shape[1:]) for i, p in enumerate(dataset.paths)}
    assert shapes["square.png"] == (64, 64)
    wide_h, wide_w = shapes["wide.png"]
    tall_h, tall_w = shapes["tall.png"]
    assert 1.7 < wide_w / wide_h < 2.4 and 1.7 < tall_h / tall_w < 2.4
    assert len(dataset.buckets) == 3

    sampler = BucketBatchSampler(dataset.bucket_ids, batch_size=2, seed=1, repeats=2)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == sorted(list(range(4)) * 2)
    for indices in batches:
        collate_examples([dataset[i] for i in indices])  # one bucket per batch, or this raises
    assert batches == list(BucketBatchSampler(dataset.bucket_ids, batch_size=2, seed=1, repeats=2))
    stream = repeat_batches(sampler)
    assert sum(len(next(stream)) for _ in range(3 * len(batches))) == 3 * 8  # epochs follow each other


def test_no_upscale_keeps_small_images_small(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    dataset = ImageFolderDataset(tmp_path, resolution=64, bucket_step=8, no_upscale=True)
    assert tuple(dataset[0].pixels.shape[1:]) == (24, 40)

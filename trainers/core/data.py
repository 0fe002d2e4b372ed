"""Image-folder datasets: safe loading, caption sidecars, subject masks and aspect-ratio buckets.

A training folder holds images (``.png .jpg .jpeg .webp .bmp``), optional captions next to them with the same stem
(``dog1.png`` + ``dog1.txt``, the kohya convention) and optional subject masks (``dog1_mask.png``, or ``dog1.png`` in
a separate mask folder). Everything is read and checked once, when the dataset is built, so bad input fails before
any training starts::

    dataset = ImageFolderDataset("photos/", resolution=512)
    sampler = BucketBatchSampler(dataset.bucket_ids, batch_size=2, seed=0)
    for indices in repeat_batches(sampler):
        batch = collate_examples([dataset[i] for i in indices])

Images are converted to RGB uint8 whatever they were stored as (grayscale, CMYK, 16-bit, palette, alpha composited on
a background), EXIF orientation is applied, and images whose header claims more pixels than a limit are refused
before decoding (decompression bombs). Unreadable files are skipped with a warning; if none is left that is an error.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.errors import InvalidInputError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTENSIONS",
    "BucketBatchSampler",
    "ImageFolderDataset",
    "TrainingBatch",
    "TrainingExample",
    "collate_examples",
    "expect_image_folder",
    "fit_to_bucket",
    "load_image_rgb",
    "load_mask",
    "make_buckets",
    "nearest_bucket",
    "repeat_batches",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Pillow's own default (about 89 megapixels): far above any photo a user trains on, far below a bomb.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
MASK_SUFFIX = "_mask"
_SILENT_SUFFIXES = {".txt", ".caption", ".json", ".toml"}


# --- loading one image ------------------------------------------------------------------------------------------


def load_image_rgb(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Open an image file as an upright RGB (8 bits per channel) Pillow image.

    The size is checked from the header before any pixel is decoded; alpha is composited on ``background``.
    Raises `InvalidInputError` for a file that is too large, not an image, or truncated.

    >>> load_image_rgb("photos/dog1.jpg").mode  # doctest: +SKIP
    'RGB'
    """
    path = Path(path)
    with _opened(path, max_pixels) as image:
        try:
            # exif_transpose decodes the pixels; a truncated file fails here.
            upright = ImageOps.exif_transpose(image)
            upright.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise InvalidInputError(f"image {path} could not be decoded (truncated or corrupt: {error})") from None
        return _to_rgb(upright, background)


def load_mask(path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a subject mask as an upright 8-bit grayscale ('L') image; white = subject, black = ignore.

    A mask with alpha uses its alpha channel when the colour channels are uniform (a cut-out PNG).
    """
    path = Path(path)
    with _opened(path, max_pixels) as image:
        try:
            upright = ImageOps.exif_transpose(image)
            upright.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise InvalidInputError(f"mask {path} could not be decoded (truncated or corrupt: {error})") from None
        if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
            rgba = upright.convert("RGBA")
            lo, hi = rgba.convert("L").getextrema()
            # A cut-out (uniform colour, shape in alpha) is read through its alpha; otherwise the colours are the mask.
            return rgba.getchannel("A") if lo == hi else _to_gray8(rgba.convert("L"))
        return _to_gray8(upright)


class _opened:
    """Context manager: `Image.open` with our own pixel limit checked from the header, and Pillow's errors mapped."""

    def __init__(self, path: Path, max_pixels: int) -> None:
        self.path = path
        self.max_pixels = max_pixels
        self.image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        try:
            # Pillow warns (between its limit and twice it) or raises (beyond); we apply our own limit below, so its
            # warning is noise here. catch_warnings restores the filter state on exit: nothing global leaks.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(self.path)
        except Image.DecompressionBombError as error:
            raise InvalidInputError(
                f"image {self.path} is too large to decode safely (possible decompression bomb): {error}"
            ) from None
        except UnidentifiedImageError:
            raise InvalidInputError(f"{self.path} is not an image Pillow can read") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise InvalidInputError(f"image {self.path} could not be opened: {error}") from None
        self.image = image
        width, height = image.size
        if width * height > self.max_pixels:
            image.close()
            raise InvalidInputError(
                f"image {self.path} is {width}x{height} ({width * height / 1e6:.1f} megapixels), more than the "
                f"limit of {self.max_pixels / 1e6:.1f}; refused as a possible decompression bomb"
            )
        if width < 1 or height < 1:
            image.close()
            raise InvalidInputError(f"image {self.path} has an empty size {width}x{height}")
        return image

    def __exit__(self, *exc: object) -> None:
        if self.image is not None:
            self.image.close()


def _to_gray8(image: Image.Image) -> Image.Image:
    """Any single-channel mode (1, L, I;16*, I, F) as 8-bit 'L', rescaling deep images instead of clipping them."""
    if image.mode in ("1", "L"):
        return image.convert("L")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
            # 16-bit samples: 65535 maps to 255.
            values = values / 257.0
        return Image.fromarray(np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8), mode="L")
    return image.convert("L")


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = image.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha or (mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I;16") or mode in ("I", "F", "1", "L"):
        return _to_gray8(image).convert("RGB")
    # CMYK, YCbCr, LAB, HSV, P without transparency: Pillow's converters.
    return image.convert("RGB")


# --- buckets ------------------------------------------------------------------------------------------------------


def make_buckets(
    resolution: int, *, step: int = 64, min_side: int | None = None, max_side: int | None = None
) -> list[tuple[int, int]]:
    """Bucket sizes ``(width, height)`` in multiples of ``step`` with area at most ``resolution**2`` (kohya style).

    Sides range from ``resolution // 2`` to ``resolution * 2`` unless given. The square bucket is always present.

    >>> (64, 64) in make_buckets(64, step=8)
    True
    """
    if resolution < step or resolution % step:
        raise InvalidInputError(f"resolution expects a multiple of {step} (at least {step}), got '{resolution}'")
    max_area = resolution * resolution
    min_side = max(step, (min_side or resolution // 2) // step * step)
    max_side = (max_side or resolution * 2) // step * step
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio); ties go to the larger bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - ratio), -wh[0] * wh[1]))


def fit_to_bucket(
    image: Image.Image, bucket: tuple[int, int], *, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> Image.Image:
    """Resize so the image covers ``bucket`` (keeping its aspect ratio), then center-crop to it."""
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / image.width, bucket_h / image.height)
    new_w = max(bucket_w, round(image.width * scale))
    new_h = max(bucket_h, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample=resample)
    left = (new_w - bucket_w) // 2
    top = (new_h - bucket_h) // 2
    return image.crop((left, top, left + bucket_w, top + bucket_h))


def _no_upscale_bucket(width: int, height: int, resolution: int, step: int) -> tuple[int, int]:
    """kohya's ``bucket_no_upscale``: an image smaller than the target area keeps its size, rounded down to ``step``."""
    if width * height > resolution * resolution:
        scale = math.sqrt(resolution * resolution / (width * height))
        width, height = int(width * scale), int(height * scale)
    return max(step, width // step * step), max(step, height // step * step)


# --- examples and the dataset -------------------------------------------------------------------------------------


@dataclass
class TrainingExample:
    """One training image: ``pixels`` float CHW in [-1, 1]; ``mask`` float 1HW in [0, 1] (1 = subject) or None."""

    pixels: torch.Tensor
    caption: str
    mask: torch.Tensor | None
    path: Path


@dataclass
class TrainingBatch:
    """Examples of one bucket stacked: ``pixels`` BCHW, ``masks`` B1HW or None, captions and paths in order."""

    pixels: torch.Tensor
    captions: list[str]
    masks: torch.Tensor | None
    paths: list[Path] = field(default_factory=list)


def expect_image_folder(path: str | Path) -> Path:
    """``path`` as a `Path` if it is a folder; else the one-line error a trainer gives for its ``--images``. Trainers
    call it before they write a run folder, so a mistyped path leaves nothing behind."""
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidInputError(f"image folder {folder} does not exist or is not a folder")
    return folder


class ImageFolderDataset(torch.utils.data.Dataset):
    """All usable images of a folder, loaded once, converted to RGB and fitted to aspect-ratio buckets.

    Args:
        root: the image folder (not searched recursively).
        resolution: target side for square images; buckets keep about ``resolution**2`` pixels.
        bucket_step: bucket sides are multiples of this (64 for SD at 512 px; 8 for tiny 64 px models).
        buckets: turn aspect-ratio buckets off to center-crop every image to a square.
        no_upscale: images smaller than the target area keep their size (rounded down to ``bucket_step``).
        default_caption: caption for images without a ``.txt`` sidecar.
        mask_dir: folder of masks named like the images; without it ``<stem>_mask.png`` next to the image is used.
        background: colour that transparent pixels are composited on.
        max_pixels: images whose header claims more pixels are refused.

    >>> ImageFolderDataset("photos/", resolution=64, bucket_step=8)[0].pixels.shape  # doctest: +SKIP
    torch.Size([3, 64, 64])
    """

    def __init__(
        self,
        root: str | Path,
        *,
        resolution: int,
        bucket_step: int = 64,
        buckets: bool = True,
        no_upscale: bool = False,
        default_caption: str = "",
        caption_extension: str = ".txt",
        mask_dir: str | Path | None = None,
        background: tuple[int, int, int] = (255, 255, 255),
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.resolution = resolution
        self.bucket_sizes = make_buckets(resolution, step=bucket_step) if buckets else [(resolution, resolution)]
        expect_image_folder(self.root)
        mask_root = Path(mask_dir) if mask_dir is not None else None
        if mask_root is not None and not mask_root.is_dir():
            raise InvalidInputError(f"mask folder {mask_root} does not exist or is not a folder")

        # 1. List candidate images; masks and captions are companions, anything else is reported.
        candidates: list[Path] = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or path.is_dir():
                continue
            suffix = path.suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                if mask_root is None and path.stem.endswith(MASK_SUFFIX):
                    continue
                candidates.append(path)
            elif suffix not in _SILENT_SUFFIXES:
                logger.warning("skipping %s: not an image (expected one of %s)", path, ", ".join(IMAGE_EXTENSIONS))
        if not candidates:
            raise InvalidInputError(f"no images found in {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)})")

        # 2. Load, convert and fit each image; unreadable ones are skipped with a warning.
        self._pixels: list[torch.Tensor] = []  # uint8 CHW, to keep memory at a quarter of float32
        self._masks: list[torch.Tensor | None] = []
        self.captions: list[str] = []
        self.paths: list[Path] = []
        self.bucket_ids: list[int] = []
        self.buckets: list[tuple[int, int]] = []
        problems: list[str] = []
        for path in candidates:
            try:
                image = load_image_rgb(path, max_pixels=max_pixels, background=background)
                mask_path = self._mask_path(path, mask_root)
                mask = load_mask(mask_path, max_pixels=max_pixels) if mask_path is not None else None
            except InvalidInputError as error:
                logger.warning("skipping %s", error)
                problems.append(str(error))
                continue
            if no_upscale:
                bucket = _no_upscale_bucket(image.width, image.height, resolution, bucket_step)
            elif buckets:
                bucket = nearest_bucket(image.width, image.height, self.bucket_sizes)
            else:
                bucket = (resolution, resolution)
            if mask is not None and mask.size != image.size:
                raise InvalidInputError(
                    f"mask {mask_path} is {mask.width}x{mask.height} but its image {path.name} is "
                    f"{image.width}x{image.height}"
                )
            fitted = fit_to_bucket(image, bucket)
            self._pixels.append(torch.from_numpy(np.array(fitted, dtype=np.uint8)).permute(2, 0, 1).contiguous())
            if mask is not None:
                fitted_mask = fit_to_bucket(mask, bucket, resample=Image.Resampling.BILINEAR)
                self._masks.append(torch.from_numpy(np.array(fitted_mask, dtype=np.uint8))[None].contiguous())
            else:
                self._masks.append(None)
            self.captions.append(self._caption(path, caption_extension, default_caption))
            self.paths.append(path)
            if bucket not in self.buckets:
                self.buckets.append(bucket)
            self.bucket_ids.append(self.buckets.index(bucket))

        if not self._pixels:
            raise InvalidInputError(
                f"no usable images in {self.root}: all {len(candidates)} failed to load (first: {problems[0]})"
            )

    @staticmethod
    def _mask_path(image_path: Path, mask_root: Path | None) -> Path | None:
        folder, stems = (
            (mask_root, [image_path.stem, image_path.stem + MASK_SUFFIX])
            if mask_root
            else (
                image_path.parent,
                [image_path.stem + MASK_SUFFIX],
            )
        )
        for stem in stems:
            for ext in IMAGE_EXTENSIONS:
                for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
                    if candidate.is_file():
                        return candidate
        return None

    @staticmethod
    def _caption(image_path: Path, extension: str, default: str) -> str:
        sidecar = image_path.with_suffix(extension)
        if not sidecar.is_file():
            return default
        try:
            text = sidecar.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidInputError(f"caption file {sidecar} is not UTF-8 text") from None
        # Captions are single prompts: fold newlines and repeated spaces.
        return " ".join(text.split()) or default

    @property
    def has_masks(self) -> bool:
        """Whether any image has a subject mask."""
        return any(m is not None for m in self._masks)

    def __len__(self) -> int:
        return len(self._pixels)

    def __getitem__(self, index: int) -> TrainingExample:
        pixels = self._pixels[index].to(torch.float32).div_(127.5).sub_(1.0)
        mask = self._masks[index]
        return TrainingExample(
            pixels=pixels,
            caption=self.captions[index],
            mask=mask.to(torch.float32).div_(255.0) if mask is not None else None,
            path=self.paths[index],
        )

    def pixels_uint8(self, index: int) -> torch.Tensor:
        """The fitted image as uint8 CHW (what latent caching hashes)."""
        return self._pixels[index]


def collate_examples(examples: Sequence[TrainingExample]) -> TrainingBatch:
    """Stack examples of one bucket; examples without a mask count as all-subject when others have one."""
    if not examples:
        raise ValueError("collate_examples needs at least one example")
    shapes = {tuple(e.pixels.shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(f"examples of one batch must share a bucket, got shapes {sorted(shapes)}")
    pixels = torch.stack([e.pixels for e in examples])
    masks = None
    if any(e.mask is not None for e in examples):
        _, _, h, w = pixels.shape
        masks = torch.stack([e.mask if e.mask is not None else torch.ones(1, h, w) for e in examples])
    return TrainingBatch(
        pixels=pixels, captions=[e.caption for e in examples], masks=masks, paths=[e.path for e in examples]
    )


# --- sampling -----------------------------------------------------------------------------------------------------


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices that all share one bucket, shuffled with a seed per epoch (deterministic).

    Each index appears ``repeats`` times per epoch (kohya's folder repeats). The last, smaller batch of a bucket is
    kept unless ``drop_last``.

    >>> list(BucketBatchSampler([0, 0, 1], batch_size=2, seed=0, shuffle=False))
    [[0, 1], [2]]
    """

    def __init__(
        self,
        bucket_ids: Sequence[int],
        *,
        batch_size: int,
        seed: int = 0,
        repeats: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise InvalidInputError(f"batch_size expects a positive int, got '{batch_size}'")
        if repeats < 1:
            raise InvalidInputError(f"repeats expects a positive int, got '{repeats}'")
        self.bucket_ids = list(bucket_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.repeats = repeats
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order `__iter__` yields (each epoch has its own shuffle)."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        by_bucket: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_ids):
            by_bucket.setdefault(bucket, []).extend([index] * self.repeats)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def repeat_batches(sampler: BucketBatchSampler) -> Iterator[list[int]]:
    """Batches forever, epoch after epoch (a training loop counts steps, not epochs)."""
    epoch = sampler.epoch
    while True:
        sampler.set_epoch(epoch)
        batches = list(sampler)
        if not batches:
            raise InvalidInputError("the sampler yields no batches (drop_last with fewer images than batch_size)")
        yield from batches
        epoch += 1

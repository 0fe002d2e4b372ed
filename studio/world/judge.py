"""The judge: reads a generated image of the shapes world and reports what is in it.

Two parts:
- a small CNN, trained on seeded renders (with blur, noise and colour jitter so it also reads a diffusion model's
  imperfect images), that reports the background, the number of objects, the shape and colour of a single object and
  the (shape, colour) pairs of two-object scenes;
- an exact analysis for concept similarity: the object is cut out from its background, normalised for position and
  size, and compared with a concept's reference images by mask overlap and colour layout. It needs no training, so it
  works for any concept, including ones it has never seen.

Train it with ``python -m studio.world.judge --out studio/assets/judge.safetensors`` (a few minutes on a CPU); the
studio ships the trained weights.

>>> from studio.world.judge import Judge
>>> judge = Judge.load()  # doctest: +SKIP
>>> judge.read([image])[0].background  # doctest: +SKIP
'blue'
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
from torch import nn

from studio.world.scene import BACKGROUNDS, COLOURS, SHAPES, Scene, random_scene, render

logger = logging.getLogger(__name__)

JUDGE_PATH = Path(__file__).resolve().parent.parent / "assets" / "judge.safetensors"
OBJECT_CLASSES: tuple[str, ...] = (*SHAPES, "toy", "emblem", "pattern")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
PAIRS: tuple[tuple[str, str], ...] = tuple((s, c) for s in SHAPES for c in COLOUR_NAMES)
WARM = {"red", "orange", "yellow"}
DARK = {"black", "purple", "blue", "gray"}


@dataclass
class Reading:
    """What the judge sees in one image."""

    background: str
    count: int
    shape: str
    colour: str
    pairs: list[tuple[str, str]]
    # Fraction of the image covered by objects (from the exact foreground analysis).
    coverage: float
    confidence: float

    def to_dict(self) -> dict[str, object]:
        return {
            "background": self.background,
            "count": self.count,
            "shape": self.shape,
            "colour": self.colour,
            "pairs": [list(p) for p in self.pairs],
            "coverage": round(self.coverage, 4),
            "confidence": round(self.confidence, 4),
        }

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Reading:
        """The reading `to_dict` wrote (its pairs as tuples again)."""
        pairs = [(str(shape), str(colour)) for shape, colour in row["pairs"]]
        return cls(
            row["background"], row["count"], row["shape"], row["colour"], pairs, row["coverage"], row["confidence"]
        )


class JudgeNet(nn.Module):
    """A small CNN with one head per question."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )  # fmt: skip

        # One cheap convolution at full resolution (where a CPU pays most), then double blocks.
        stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.features = nn.Sequential(
            stem,
            nn.MaxPool2d(2),
            block(32, 64),
            nn.MaxPool2d(2),
            block(64, 128),
            nn.MaxPool2d(2),
            block(128, 128),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        width = 128 * 4
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(width, 256), nn.ReLU(inplace=True))
        self.background = nn.Linear(256, len(BACKGROUNDS))
        self.count = nn.Linear(256, 2)
        self.shape = nn.Linear(256, len(OBJECT_CLASSES))
        self.colour = nn.Linear(256, len(COLOUR_NAMES))
        self.pairs = nn.Linear(256, len(PAIRS))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.pool(self.features(x)))
        return {
            "background": self.background(h),
            "count": self.count(h),
            "shape": self.shape(h),
            "colour": self.colour(h),
            "pairs": self.pairs(h),
        }


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    arrays = [
        np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32) for im in images
    ]
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Exact analysis: foreground and concept similarity


def _quantise(pixels: np.ndarray) -> np.ndarray:
    return (pixels // 32).astype(np.int32) @ np.array([64, 8, 1], dtype=np.int32)


def foreground_mask(image: Image.Image) -> np.ndarray:
    """Pixels that belong to objects: far from every dominant colour of the image border."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = pixels.shape
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    codes = _quantise(border)
    values, counts = np.unique(codes, return_counts=True)
    dominant = values[np.argsort(-counts)][:3]
    shares = np.sort(counts)[::-1][:3] / counts.sum()
    centres = [border[codes == v].mean(axis=0) for v, s in zip(dominant, shares, strict=False) if s > 0.12]
    if not centres:
        # A noisy border with no dominant colour: fall back to its most common one.
        centres = [border[codes == dominant[0]].mean(axis=0)]
    distance = np.min(np.stack([np.linalg.norm(pixels - c, axis=-1) for c in centres]), axis=0)
    return distance > 60.0


def object_masks(image: Image.Image, max_objects: int = 2, min_pixels: int = 6) -> list[np.ndarray]:
    """The foreground split into its connected parts (8-neighbourhood), largest first, at most ``max_objects``."""
    mask = foreground_mask(image)
    seen = np.zeros(mask.shape, dtype=bool)
    h, w = mask.shape
    parts: list[np.ndarray] = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        part = np.zeros(mask.shape, dtype=bool)
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            part[y, x] = True
            for ny in range(max(0, y - 1), min(h, y + 2)):
                for nx in range(max(0, x - 1), min(w, x + 2)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        if part.sum() >= min_pixels:
            parts.append(part)
    return sorted(parts, key=lambda p: -int(p.sum()))[:max_objects]


def object_concept_similarities(
    images: Sequence[Image.Image], references: Sequence[Sequence[Image.Image]]
) -> list[list[float]]:
    """For images meant to show one object per concept: per image, each concept's similarity to its own object.

    Objects are an image's connected foreground parts; each goes to at most one concept, choosing the assignment
    with the highest total similarity. A concept left without an object (too few parts: missing or merged) scores 0.
    """
    from itertools import permutations

    refs = [[d for d in (_crop_descriptor(r) for r in group) if d is not None] for group in references]
    results = []
    for image in images:
        objects = [_crop_descriptor(image, mask=m) for m in object_masks(image, max_objects=len(references))]
        objects = [d for d in objects if d is not None]
        table = [[max((_pair_similarity(o, r) for r in group), default=0.0) for o in objects] for group in refs]
        best = [0.0] * len(references)
        slots = list(range(len(objects))) + [None] * len(references)
        for choice in set(permutations(slots, len(references))):
            scores = [0.0 if j is None else table[i][j] for i, j in enumerate(choice)]
            if sum(scores) > sum(best):
                best = scores
        results.append(best)
    return results


def _crop_descriptor(
    image: Image.Image, size: int = 24, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    mask = foreground_mask(image) if mask is None else mask
    ys, xs = np.nonzero(mask)
    if len(ys) < 6:
        return None
    y0, y1 = np.percentile(ys, [1, 99]).astype(int)
    x0, x1 = np.percentile(xs, [1, 99]).astype(int)
    side = max(y1 - y0, x1 - x0) + 1
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    box = (int(cx - side / 2), int(cy - side / 2), int(cx - side / 2) + side, int(cy - side / 2) + side)
    rgb = image.convert("RGB").crop(box).resize((size, size), Image.Resampling.BILINEAR)
    m = Image.fromarray((mask * 255).astype(np.uint8)).crop(box).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 255.0, np.asarray(m, dtype=np.float32) / 255.0


def _pair_similarity(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    (rgb_a, m_a), (rgb_b, m_b) = a, b
    iou = float(np.minimum(m_a, m_b).sum() / max(1e-6, np.maximum(m_a, m_b).sum()))
    both = np.minimum(m_a, m_b)
    colour = 1.0 - float((np.abs(rgb_a - rgb_b).mean(axis=-1) * both).sum() / max(1e-6, both.sum())) * 2.0
    hist_a = _colour_histogram(rgb_a, m_a)
    hist_b = _colour_histogram(rgb_b, m_b)
    hist = float(np.minimum(hist_a, hist_b).sum())
    return max(0.0, 0.35 * iou + 0.35 * max(0.0, colour) + 0.3 * hist)


def _colour_histogram(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    codes = _quantise(rgb * 255.0).reshape(-1)
    weights = mask.reshape(-1)
    hist = np.bincount(codes, weights=weights, minlength=512)
    return hist / max(1e-6, hist.sum())


def concept_similarity(images: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
    """Similarity in [0, 1] of each image's object to a concept's reference images (best match over references).

    Position, size and background do not matter; shape and colour layout do. An image with no object scores 0.
    """
    return _best_matches(images, references, [None] * len(images))


def _best_matches(
    images: Sequence[Image.Image], references: Sequence[Image.Image], masks: Sequence[np.ndarray | None]
) -> list[float]:
    """Each image's object (its whole foreground, or its mask) against the best-matching reference; 0 if none."""
    refs = [d for d in (_crop_descriptor(r) for r in references) if d is not None]
    scores = []
    for image, mask in zip(images, masks, strict=True):
        d = _crop_descriptor(image, mask=mask)
        scores.append(0.0 if d is None or not refs else max(_pair_similarity(d, r) for r in refs))
    return scores


def window_concept_similarity(
    images: Sequence[Image.Image], references: Sequence[Image.Image], *, layout: str = "columns"
) -> list[float]:
    """`concept_similarity` for windows cut from a wider image, one subject per window (latent regions).

    A neighbouring region's subject can reach into a window across its shared sides (the left and right sides for
    "columns", top and bottom for "rows"); foreground parts touching those sides are the neighbours', so the
    window's own object is what is left. A window whose only object touches them scores 0.
    """
    masks = []
    for image in images:
        own = np.zeros((image.height, image.width), dtype=bool)
        for part in object_masks(image, max_objects=64, min_pixels=1):
            edges = (part[:, 0], part[:, -1]) if layout == "columns" else (part[0], part[-1])
            if not any(edge.any() for edge in edges):
                own |= part
        masks.append(own)
    return _best_matches(images, references, masks)


# ---------------------------------------------------------------------------------------------------------------------
# The judge


class Judge:
    """Reads images of the shapes world. Load the shipped weights with `Judge.load()`."""

    def __init__(self, net: JudgeNet) -> None:
        self.net = net.eval()

    @classmethod
    def load(cls, path: Path = JUDGE_PATH) -> Judge:
        net = JudgeNet()
        net.load_state_dict(load_file(str(path)))
        return cls(net)

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image], batch_size: int = 128) -> list[Reading]:
        """Read a batch of images."""
        readings: list[Reading] = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            out = self.net(to_tensor(chunk))
            bg = out["background"].softmax(-1)
            count = out["count"].argmax(-1) + 1
            shape = out["shape"].softmax(-1)
            colour = out["colour"].softmax(-1)
            pairs = out["pairs"].sigmoid()
            for j, image in enumerate(chunk):
                top_pairs = [PAIRS[k] for k in pairs[j].topk(2).indices.tolist()]
                readings.append(
                    Reading(
                        background=BACKGROUNDS[int(bg[j].argmax())],
                        count=int(count[j]),
                        shape=OBJECT_CLASSES[int(shape[j].argmax())],
                        colour=COLOUR_NAMES[int(colour[j].argmax())],
                        pairs=top_pairs if int(count[j]) == 2 else top_pairs[:1],
                        coverage=float(foreground_mask(image).mean()),
                        confidence=float(bg[j].max() * shape[j].max() * colour[j].max()),
                    )
                )
        return readings

    def complies(self, reading: Reading, scene: Scene) -> bool:
        """Whether a reading matches a scene's caption: background and each object's shape and colour."""
        if reading.background != scene.background:
            return False
        if len(scene.objects) == 1:
            obj = scene.objects[0]
            return reading.shape == obj.shape and reading.colour == obj.colour
        wanted = {(o.shape, str(o.colour)) for o in scene.objects}
        return reading.count == 2 and set(reading.pairs) == wanted


# ---------------------------------------------------------------------------------------------------------------------
# Training


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """Make a render look like a small diffusion model's output: soft edges, noise, slightly off colours."""
    if rng.random() < 0.7:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2)))
    arr = np.asarray(image, dtype=np.float32)
    arr = arr * rng.uniform(0.9, 1.1) + np.array([rng.uniform(-14, 14) for _ in range(3)], dtype=np.float32)
    arr = arr + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(0, 10), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def targets_for(scene: Scene) -> dict[str, torch.Tensor]:
    pairs = torch.zeros(len(PAIRS))
    for o in scene.objects:
        if (o.shape, o.colour) in PAIRS:
            pairs[PAIRS.index((o.shape, str(o.colour)))] = 1.0
    obj = scene.objects[0]
    return {
        "background": torch.tensor(BACKGROUNDS.index(scene.background)),
        "count": torch.tensor(len(scene.objects) - 1),
        "shape": torch.tensor(OBJECT_CLASSES.index(obj.shape) if len(scene.objects) == 1 else -100),
        "colour": torch.tensor(COLOUR_NAMES.index(str(obj.colour)) if len(scene.objects) == 1 else -100),
        "pairs": pairs,
    }


def make_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Scene]]:
    scenes = [random_scene(rng, allow_held_out=True, two_object_prob=0.3, class_prob=0.15) for _ in range(n)]
    images = [degrade(render(s), rng) for s in scenes]
    targets = [targets_for(s) for s in scenes]
    return to_tensor(images), {k: torch.stack([t[k] for t in targets]) for k in targets[0]}, scenes


def train_judge(steps: int, batch_size: int, seed: int) -> JudgeNet:
    torch.manual_seed(seed)
    rng = random.Random(f"judge:{seed}")
    net = JudgeNet().train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    start = time.time()
    for step in range(steps):
        x, y, _ = make_batch(rng, batch_size)
        out = net(x)
        loss = (
            F.cross_entropy(out["background"], y["background"])
            + F.cross_entropy(out["count"], y["count"])
            + F.cross_entropy(out["shape"], y["shape"], ignore_index=-100)
            + F.cross_entropy(out["colour"], y["colour"], ignore_index=-100)
            + F.binary_cross_entropy_with_logits(out["pairs"], y["pairs"]) * 10
        )
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0:
            logger.info("judge step %d/%d loss %.4f (%.0fs)", step, steps, loss.item(), time.time() - start)
    return net.eval()


def validate(judge: Judge, n: int, seed: int) -> dict[str, float]:
    """Accuracy on held-out (unseen seed) degraded renders."""
    rng = random.Random(f"judge-validation:{seed}")
    scenes = [random_scene(rng, allow_held_out=True, two_object_prob=0.3, class_prob=0.15) for _ in range(n)]
    readings = judge.read([degrade(render(s), rng) for s in scenes])
    single = [(r, s) for r, s in zip(readings, scenes, strict=True) if len(s.objects) == 1]
    double = [(r, s) for r, s in zip(readings, scenes, strict=True) if len(s.objects) == 2]
    return {
        "background": float(np.mean([r.background == s.background for r, s in zip(readings, scenes, strict=True)])),
        "count": float(np.mean([r.count == len(s.objects) for r, s in zip(readings, scenes, strict=True)])),
        "single_shape": float(np.mean([r.shape == s.objects[0].shape for r, s in single])),
        "single_colour": float(np.mean([r.colour == s.objects[0].colour for r, s in single])),
        "single_all": float(np.mean([judge.complies(r, s) for r, s in single])),
        "double_all": float(np.mean([judge.complies(r, s) for r, s in double])),
        "n": float(n),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train and validate the shapes-world judge.")
    parser.add_argument("--out", type=Path, default=JUDGE_PATH)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validate-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.validate_only:
        net = train_judge(args.steps, args.batch_size, args.seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out), metadata={"studio.kind": "judge"}
        )
    report = validate(Judge.load(args.out), 2000, args.seed)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``studio generate``: one request through the shared pipeline, images saved as PNGs with their metadata.

>>> # studio generate --prompt "a photo of <my-dog>" --adapter my-dog --adapter watercolor:0.6 --seed 1 --num-images 2
"""

from __future__ import annotations

import argparse
import secrets
import time
from pathlib import Path

from pipelines.metadata import save_png
from pipelines.requests import AdapterRef, GenerationRequest
from pipelines.service import shared_service
from studio.errors import InvalidInputError
from studio.home import StudioHome

_DEFAULTS = GenerationRequest(prompt="")


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The `GenerationRequest` of ``studio generate``'s arguments, validated.

    Without ``--seed`` a random seed is drawn (and recorded in every image's metadata); ``--num-images N`` uses the
    seeds ``seed, seed+1, ..., seed+N-1`` so that each image can be made again on its own.
    """
    seed = getattr(args, "seed", None)
    if seed is None:
        seed = secrets.randbelow(2**32)
    count = getattr(args, "num_images", None) or 1
    steps = getattr(args, "steps", None)
    guidance = getattr(args, "guidance", None)
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=getattr(args, "negative", None) or "",
        seeds=[seed + index for index in range(count)],
        steps=_DEFAULTS.steps if steps is None else steps,
        guidance=_DEFAULTS.guidance if guidance is None else guidance,
        width=getattr(args, "width", None),
        height=getattr(args, "height", None),
        scheduler=getattr(args, "scheduler", None),
        adapters=[AdapterRef.parse(text) for text in getattr(args, "adapter", None) or []],
        regions=getattr(args, "regions", None),
    )
    base_ratio = getattr(args, "base_ratio", None)
    if base_ratio is not None:
        request.base_ratio = base_ratio
    region_mode = getattr(args, "region_mode", None)
    if region_mode is not None:
        request.region_mode = region_mode
    request.validate()
    return request


def output_paths(out: Path, seeds: list[int], stamp: str) -> list[Path]:
    """Where the images go: ``out`` itself when it names one ``.png``, else ``<out>/<stamp>-<seed>.png`` files.

    Existing files are never overwritten: a counter is added to the name instead.
    """
    if out.suffix.lower() == ".png":
        if len(seeds) != 1:
            raise InvalidInputError(f"--out names one file ('{out.name}') but {len(seeds)} images were asked for")
        return [out]
    if out.suffix and not out.is_dir():
        raise InvalidInputError(f"expected --out to be a folder or a .png file, found '{out}'")
    paths: list[Path] = []
    for seed in seeds:
        path = out / f"{stamp}-{seed}.png"
        counter = 1
        while path.exists() or path in paths:
            path = out / f"{stamp}-{seed}-{counter}.png"
            counter += 1
        paths.append(path)
    return paths


def generate_from_cli(args: argparse.Namespace, home: StudioHome) -> int:
    """Run ``studio generate``: print the path of each saved image, one per line; return the exit status."""
    # 1. Check everything cheap before loading the model.
    request = request_from_args(args)
    out = Path(args.out).expanduser() if getattr(args, "out", None) else home.outputs
    paths = output_paths(out, request.seeds, time.strftime("%Y%m%d-%H%M%S"))

    # 2. Generate through the shared pipeline (adapters from this home's library).
    service = shared_service(getattr(args, "base", None) or "tiny", home, device=getattr(args, "device", None))
    result = service.generate(request)

    # 3. Save with metadata, so every image can be made again.
    for image, metadata, path in zip(result.images, result.metadata, paths, strict=True):
        print(save_png(image, path, metadata))
    return 0

"""Reproducible images: generation metadata in PNG text chunks.

Every image the studio saves carries two text chunks:

- ``parameters``: the AUTOMATIC1111 layout (prompt, ``Negative prompt: ...``, then ``Steps: 20, Sampler: ...``), so
  A1111, ComfyUI and image viewers that read it show the settings. LoRAs appear in the prompt as ``<lora:name:w>``
  the way A1111 writes them, and their file hashes under ``Lora hashes``.
- ``studio``: the full metadata as JSON (base model fingerprint, every adapter with weight, options and sha256),
  which `read_png_metadata` returns and which is enough to make the same image again.

>>> import tempfile, pathlib
>>> from PIL import Image
>>> path = pathlib.Path(tempfile.mkdtemp()) / "x.png"
>>> _ = save_png(Image.new("RGB", (8, 8)), path, {"prompt": "a cat", "seed": 3, "steps": 20})
>>> read_png_metadata(path)["seed"]
3
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from studio.errors import InvalidInputError, NotFoundError

PARAMETERS_KEY = "parameters"
STUDIO_KEY = "studio"

# Scheduler names as A1111 prints them in "Sampler:", so its UI recognises them.
_A1111_SAMPLERS = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpm++": "DPM++ 2M",
    "dpm++_sde": "DPM++ 2M SDE",
    "unipc": "UniPC",
}


def a1111_parameters(metadata: dict[str, Any]) -> str:
    """The A1111 ``parameters`` text of one image's metadata.

    >>> print(a1111_parameters({"prompt": "a cat", "negative_prompt": "", "steps": 20, "scheduler": "euler_a",
    ...                         "guidance": 7.5, "seed": 1, "width": 64, "height": 64}))
    a cat
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 64x64
    """
    adapters = metadata.get("adapters", [])
    loras = [adapter for adapter in adapters if adapter.get("kind") == "lora"]
    prompt = str(metadata.get("prompt", ""))
    lora_tags = " ".join(f"<lora:{adapter['name']}:{adapter.get('weight', 1.0):g}>" for adapter in loras)
    lines = [f"{prompt} {lora_tags}".strip()]
    if metadata.get("negative_prompt"):
        lines.append(f"Negative prompt: {metadata['negative_prompt']}")
    fields: list[tuple[str, Any]] = [
        ("Steps", metadata.get("steps")),
        ("Sampler", _A1111_SAMPLERS.get(str(metadata.get("scheduler")), metadata.get("scheduler"))),
        ("CFG scale", metadata.get("guidance")),
        ("Seed", metadata.get("seed")),
    ]
    if metadata.get("width") and metadata.get("height"):
        fields.append(("Size", f"{metadata['width']}x{metadata['height']}"))
    if metadata.get("base_fingerprint"):
        fields.append(("Model hash", metadata["base_fingerprint"][:10]))
    if metadata.get("base_model"):
        fields.append(("Model", metadata["base_model"]))
    if loras:
        hashes = ", ".join(f"{adapter['name']}: {str(adapter.get('sha256', ''))[:12]}" for adapter in loras)
        fields.append(("Lora hashes", f'"{hashes}"'))
    others = [adapter for adapter in adapters if adapter.get("kind") != "lora"]
    if others:
        hashes = ", ".join(f"{adapter['name']}: {str(adapter.get('sha256', ''))[:12]}" for adapter in others)
        fields.append(("TI hashes", f'"{hashes}"'))
    lines.append(", ".join(f"{key}: {value}" for key, value in fields if value is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | os.PathLike[str], metadata: dict[str, Any]) -> Path:
    """Save ``image`` as a PNG at ``path`` with ``parameters`` (A1111) and ``studio`` (JSON) text chunks.

    The file is written next to its final name and renamed into place, so a reader never sees half an image.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidInputError(f"expected an output path ending in .png, found '{path.name}'")
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(metadata))
    info.add_text(STUDIO_KEY, json.dumps(metadata, sort_keys=True, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_png_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The studio metadata of a PNG written by `save_png`, plus its A1111 text under ``"parameters"``.

    A PNG from another tool that has only A1111 ``parameters`` gives ``{"parameters": text}``.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"expected a PNG file at '{path}', found nothing")
    with Image.open(path) as image:
        texts = dict(getattr(image, "text", {}) or {})
    result: dict[str, Any] = {}
    if STUDIO_KEY in texts:
        try:
            result = json.loads(texts[STUDIO_KEY])
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"'{path.name}' has a 'studio' text chunk that is not JSON ({exc.msg})") from exc
    if PARAMETERS_KEY in texts:
        result[PARAMETERS_KEY] = texts[PARAMETERS_KEY]
    if not result:
        raise NotFoundError(f"expected generation metadata in '{path.name}', found no 'studio' or 'parameters' text")
    return result

"""Benchmark NeTI generation: time with a NeTI concept vs without, and the reference design's cost, in one run.

Run: ``python bench/bench_neti.py [--steps 20] [--rounds 5]`` (``--gpu`` to use CUDA when present). The base model is
``studio/assets/tiny`` when built, else the random tiny SD1.x pipeline; the concept is a NeTI mapper for that base
(``--adapter FILE`` for a trained one; the cost does not depend on the weights). Requests go through
`PipelineService` with the same prompt, steps, scheduler and seed; rounds are interleaved so background load hits
each kind alike, and medians of this process's CPU time are reported (wall time on GPU).

Rows:

- ``base``: no adapter.
- ``neti (cold)``: a new prompt every round, so the mapper and the text encoder run for every (t, layer) of the grid
  (one batched call each) inside the request.
- ``neti (warm)``: the same request again: the conditionings come from the cache.
- ``reference``: the reference design's cost: one text-encoder call per timestep and layer (steps x layers calls of
  one prompt each) and unbatched guidance (the U-Net runs the negative and the positive prompt separately), in a
  denoising loop of the same scheduler and steps.

Target: ``neti (cold) / base <= 1.10``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pipelines.kinds.conditioning import ConditioningState, KeyValueStates, LayerCall  # noqa: E402
from pipelines.kinds.neti import NetiKind  # noqa: E402
from pipelines.requests import AdapterRef, GenerationRequest  # noqa: E402
from pipelines.service import PipelineService  # noqa: E402
from studio.adapter_files import load_adapter, save_adapter  # noqa: E402
from studio.base_models import BaseModel, load_base_model  # noqa: E402
from studio.testing import build_tiny_sd1_pipeline, tiny_model_path  # noqa: E402
from trainers.core.config import load_config  # noqa: E402
from trainers.neti import NetiConfig, build_mapper, neti_adapter  # noqa: E402

TARGET_RATIO = 1.10
TOKEN = "<bench-toy>"
NAME = "bench-neti"


def load_base() -> BaseModel:
    """The tiny model when built, else the random tiny SD1.x pipeline."""
    if (tiny_model_path() / "model_index.json").is_file():
        return load_base_model("tiny")
    return BaseModel.from_pipeline(build_tiny_sd1_pipeline(), "tiny-random")


class _ReferenceState(ConditioningState):
    """Per-layer states of the current timestep, computed the reference way: one text-encoder call per layer."""

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.positive = False

    def key_value_states(self, call: LayerCall) -> KeyValueStates | None:
        if not self.positive:
            return None
        plain, bypassed = self.layers[call.layer_index]
        return KeyValueStates(plain.to(call.encoder_hidden_states.dtype), bypassed.to(call.encoder_hidden_states.dtype))


def reference_generation(service: PipelineService, kind: NetiKind, prompt: str, steps: int, guidance: float) -> None:
    """A denoising loop with the reference code's costs (sequential text-encoder calls, unbatched guidance)."""
    pipe = service.pipeline
    device = service.device
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    negative = pipe.encode_prompt("", device, 1, do_classifier_free_guidance=False)[0]
    positive = pipe.encode_prompt(prompt, device, 1, do_classifier_free_guidance=False)[0]
    size = int(pipe.unet.config.sample_size)
    generator = torch.Generator("cpu").manual_seed(1)
    latents = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=generator).to(device)
    latents = latents * scheduler.init_noise_sigma
    prompts = kind.text.tokenize([prompt])
    state = _ReferenceState()
    with torch.no_grad(), service._seam.context.activate([("reference", state)]):
        for t in scheduler.timesteps:
            state.layers = []
            for layer in range(kind.spec.n_layers):
                plain, bypassed = kind.compute(prompts, [float(t)], None, device, pipe.unet.dtype)
                state.layers.append((plain[0, layer], bypassed[0, layer]))
            model_input = scheduler.scale_model_input(latents, t)
            state.positive = False
            uncond = pipe.unet(model_input, t, negative).sample
            state.positive = True
            cond = pipe.unet(model_input, t, positive).sample
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)


def measure(fn: Callable[[], Any], cuda: bool) -> float:
    """CPU seconds of this process (wall seconds on CUDA, synchronised)."""
    if cuda:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--adapter", type=Path, help="a trained NeTI file for the base model (default: random)")
    parser.add_argument("--gpu", action="store_true", help="use CUDA when available")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-design baseline")
    parser.add_argument("--images", type=int, default=1, help="images (seeds) per request")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: CPU time then counts work, not spinning)"
    )
    args = parser.parse_args()

    device = "cuda" if args.gpu and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    base = load_base()
    folder = Path(tempfile.mkdtemp(prefix="bench-neti-"))
    if args.adapter is not None:
        adapter = load_adapter(args.adapter)
        token = adapter.metadata.placeholder_tokens[0]
    else:
        config = load_config(NetiConfig, overrides=[f"placeholder_token={TOKEN}", "super_category=toy"])
        pipe = base.pipeline
        adapter = neti_adapter(
            build_mapper(config, pipe, base.family, len(base.family.cross_attention_layers(pipe.unet)))
        )
        token = TOKEN
    save_adapter(folder / f"{NAME}.safetensors", adapter)
    service = PipelineService(base, device, adapter_source=folder)
    layers = len(service.layer_names)

    def request(prompt: str, neti: bool) -> GenerationRequest:
        adapters = [AdapterRef(NAME)] if neti else []
        return GenerationRequest(
            prompt=prompt,
            seeds=list(range(1, args.images + 1)),
            steps=args.steps,
            guidance=args.guidance,
            adapters=adapters,
        )

    warm_prompt = f"a {token} on a blue background"
    service.generate(request(warm_prompt, True))  # load the adapter, fill the warm cache, warm up kernels
    service.generate(request(warm_prompt.replace(token, "toy"), False))
    kind = service._kinds[NAME]
    times: dict[str, list[float]] = {"base": [], "neti (cold)": [], "neti (warm)": [], "reference": []}
    cuda = device == "cuda"
    for round_index in range(args.rounds):
        cold_prompt = f"a {token} on a red background, take {round_index}"
        times["base"].append(measure(lambda: service.generate(request(warm_prompt.replace(token, "toy"), False)), cuda))
        times["neti (cold)"].append(measure(lambda p=cold_prompt: service.generate(request(p, True)), cuda))
        times["neti (warm)"].append(measure(lambda: service.generate(request(warm_prompt, True)), cuda))
        if not args.no_reference:
            times["reference"].append(
                measure(lambda: reference_generation(service, kind, warm_prompt, args.steps, args.guidance), cuda)
            )

    base_time = statistics.median(times["base"])
    unit = "wall s" if cuda else "CPU s"
    print(
        f"base model: {base.name} ({base.family.label}, {layers} cross-attention layers), device {device}, "
        f"{args.steps} steps, guidance {args.guidance}, {args.images} image(s) per request, {args.rounds} rounds, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(f"{'row':<14}{'median ' + unit:>14}{'x base':>9}  text-encoder calls per image")
    calls = {
        "base": "1 (+1 negative)",
        "neti (cold)": "1 batched",
        "neti (warm)": "0",
        "reference": f"{args.steps * layers}",
    }
    for row, values in times.items():
        if values:
            median = statistics.median(values)
            print(f"{row:<14}{median:>14.3f}{median / base_time:>9.2f}  {calls[row]}")
    ratio = statistics.median(times["neti (cold)"]) / base_time
    verdict = "OK" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    print(f"neti (cold) / base = {ratio:.3f} (target <= {TARGET_RATIO:.2f}): {verdict}")


if __name__ == "__main__":
    main()

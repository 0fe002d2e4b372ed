"""Benchmark the shared pipeline: adapter switch cost, cold loads and active-adapter overhead, as ratios in one run.

Run: ``python bench/bench_pipeline.py`` (a few minutes on a CPU; ``--skip-sd15`` for about one). Two parts:

1. The tiny model (``studio/assets/tiny`` when built, else the random tiny SD1.x pipeline), full requests through
   `PipelineService` at 20 steps. Requests are interleaved in rounds (base, base, A, A, B, B) so that background
   load hits every kind of request alike; medians are reported. Targets: a request whose cached adapter set differs
   from the previous one costs at most 1.10x the same request with the set already active, and switching reads no
   adapter file.
2. The SD1.5 U-Net architecture (from its config, random weights, no download) with a rank-8 LoRA on every attention
   projection: the switch itself (``set_adapters``), a cold load (file read + ``load_lora_weights``), and one U-Net
   forward on 64x64 latents (512 px) with and without the LoRA, to put the switch in proportion.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402

from pipelines.cache import AdapterCache  # noqa: E402
from pipelines.kinds.lora import LoraSlots  # noqa: E402
from pipelines.requests import AdapterRef, GenerationRequest  # noqa: E402
from pipelines.service import PipelineService  # noqa: E402
from studio.adapter_files import AdapterFile, AdapterMetadata, load_adapter, save_adapter  # noqa: E402
from studio.base_models import BaseModel, load_base_model  # noqa: E402
from studio.families import detect_family  # noqa: E402
from studio.testing import build_tiny_sd1_pipeline, sd15_unet_config, tiny_model_path  # noqa: E402

TARGET_SWITCH_RATIO = 1.10


def random_lora(unet: torch.nn.Module, family, rank: int, seed: int) -> AdapterFile:
    """A kohya-layout LoRA on every attention projection of ``unet``, with non-zero up weights."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(module, torch.nn.Linear):
            key = family.kohya_unet_key(name)
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    return AdapterFile(tensors, AdapterMetadata(kind="lora", family=family.name))


class CountingLoader:
    def __init__(self) -> None:
        self.reads = 0

    def __call__(self, path: Path) -> AdapterFile:
        self.reads += 1
        return load_adapter(path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_timed(fn) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds). CPU time is what the ratios use: on a shared machine other
    processes stretch wall time at random, while the work this process does stays the same."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def bench_tiny(folder: Path, steps: int, rounds: int, size: int) -> None:
    if (tiny_model_path() / "model_index.json").is_file():
        base = load_base_model("tiny")
    else:
        base = BaseModel.from_pipeline(build_tiny_sd1_pipeline(seed=0), "tiny-random")
    for name, seed in (("lora-a", 1), ("lora-b", 2)):
        save_adapter(folder / f"{name}.safetensors", random_lora(base.pipeline.unet, base.family, rank=8, seed=seed))
    loader = CountingLoader()
    service = PipelineService(base, "cpu", adapter_source=folder, loader=loader)

    def request(*names: str) -> GenerationRequest:
        return GenerationRequest(
            prompt="a red circle",
            seeds=[0],
            steps=steps,
            width=size,
            height=size,
            adapters=[AdapterRef(n) for n in names],
        )

    service.generate(request())  # warm-up: first-call allocations
    cold = service.generate(request("lora-a"))
    cold_load = cold.timings["resolve_s"] + cold.timings["activate_s"]
    service.generate(request("lora-b"))
    reads_before = loader.reads

    samples: dict[str, list[tuple[float, float]]] = {"base": [], "switch to none": [], "switch": [], "same set": []}
    for _ in range(rounds):
        for names, label in (
            ((), "switch to none"),
            ((), "base"),
            (("lora-a",), "switch"),
            (("lora-a",), "same set"),
            (("lora-b",), "switch"),
            (("lora-b",), "same set"),
        ):
            samples[label].append(cpu_timed(lambda names=names: service.generate(request(*names))))
    median = {label: statistics.median(cpu for cpu, _ in values) for label, values in samples.items()}
    wall = {label: statistics.median(w for _, w in values) for label, values in samples.items()}

    print(f"== tiny model '{base.name}' ({base.family.label}), {size}x{size}, {steps} steps, {rounds} rounds ==")
    print("medians; ratios use CPU time of this process (wall time on a shared machine is noise)")
    print(f"{'':32}{'CPU ms':>10}{'wall ms':>10}")
    for label, text in (
        ("base", "base generation"),
        ("same set", "adapter set already active"),
        ("switch", "adapter set differs (switch)"),
        ("switch to none", "no adapters after a LoRA"),
    ):
        print(f"{text:32}{median[label] * 1000:10.1f}{wall[label] * 1000:10.1f}")
    print(f"{'cold load of a LoRA (read+load)':32}{'':10}{cold_load * 1000:10.1f}")
    ratio = median["switch"] / median["same set"]
    verdict = "ok" if ratio <= TARGET_SWITCH_RATIO else "over target"
    print(f"switch / same set               {ratio:9.3f}  (target <= {TARGET_SWITCH_RATIO}: {verdict})")
    print(f"active LoRA set / base          {median['same set'] / median['base']:9.3f}")
    print(f"cold load / base generation     {cold_load / median['base']:9.3f}")
    print(f"adapter file reads: {reads_before} before switching, {loader.reads} after (must not grow)")


def bench_sd15(folder: Path, rank: int) -> None:
    tiny = build_tiny_sd1_pipeline(seed=0)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**sd15_unet_config()).eval()
    built = time.perf_counter() - start
    # A pipeline around the full-size U-Net so that diffusers' own kohya loader and set_adapters are what is timed;
    # its tiny text encoder and VAE are never run here.
    pipe = StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=unet,
        scheduler=tiny.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    family = detect_family(pipe)
    for name, seed in (("sd15-a", 1), ("sd15-b", 2)):
        save_adapter(folder / f"{name}.safetensors", random_lora(unet, family, rank=rank, seed=seed))
    loader = CountingLoader()
    cache = AdapterCache(lambda name: folder / f"{name}.safetensors", budget_bytes=1 << 31, loader=loader)
    slots = LoraSlots(pipe)

    cold = {}
    for name in ("sd15-a", "sd15-b"):
        start = time.perf_counter()
        entry = cache.get(name)
        read = time.perf_counter()
        slots.ensure(name, entry.adapter)
        cold[name] = (read - start, time.perf_counter() - read, entry.nbytes)

    switches = []
    for _ in range(5):
        for name in ("sd15-a", "sd15-b"):
            start = time.perf_counter()
            cache.get(name)
            slots.activate([(name, 1.0)])
            switches.append(time.perf_counter() - start)
    reads_after = loader.reads

    sample = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    states = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        slots.activate([])
        base_forward, base_wall = cpu_timed(lambda: unet(sample, 500, encoder_hidden_states=states))
        slots.activate([("sd15-a", 1.0)])
        lora_forward, lora_wall = cpu_timed(lambda: unet(sample, 500, encoder_hidden_states=states))

    read_s, load_s, nbytes = cold["sd15-a"]
    switch = statistics.median(switches)
    print(f"== SD1.5 U-Net (random weights, built in {built:.1f} s), LoRA rank {rank} on to_q/k/v/out ==")
    print(f"LoRA file size                  {nbytes / 1e6:9.1f} MB of tensors")
    print(f"cold load: read + check file    {read_s * 1000:9.1f} ms")
    print(f"cold load: load_lora_weights    {load_s * 1000:9.1f} ms")
    print(f"switch between cached LoRAs     {switch * 1000:9.1f} ms  (median of {len(switches)})")
    print(f"U-Net forward, 64x64 latents    {base_wall * 1000:9.1f} ms  base ({base_forward * 1000:.0f} ms CPU)")
    print(f"U-Net forward, 64x64 latents    {lora_wall * 1000:9.1f} ms  LoRA active ({lora_forward * 1000:.0f} ms CPU)")
    print(f"active LoRA / base forward      {lora_forward / base_forward:9.3f}  (CPU time)")
    print(f"switch / one U-Net forward      {switch / base_wall:9.4f}")
    print(f"cold load / one U-Net forward   {(read_s + load_s) / base_wall:9.3f}")
    print(f"adapter file reads: {reads_after} (2 cold loads; switching reads none)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--size",
        type=int,
        default=32,
        help="tiny image side (default 32: five times faster than 64 on a CPU; a cheaper generation makes the "
        "switch ratio stricter, since the switch cost does not shrink with the image)",
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank at SD1.5 scale")
    parser.add_argument("--skip-sd15", action="store_true", help="only the tiny model")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a busy machine, OpenMP threads spin while waiting for each other and "
        "turn CPU time into noise; one thread keeps CPU time a measure of the work)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        bench_tiny(Path(tmp), args.steps, args.rounds, args.size)
        if not args.skip_sd15:
            bench_sd15(Path(tmp), args.rank)


if __name__ == "__main__":
    main()

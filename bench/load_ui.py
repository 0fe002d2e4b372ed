"""Load on the web app: 8 concurrent `gradio_client` users on `tiny`, each generating with its own adapter set.

Run: ``python bench/load_ui.py`` (a few minutes on 2 CPU cores). It builds 8 small adapters in a temporary studio
home with the studio's own file code (4 textual-inversion embeddings, 4 LoRAs on the U-Net's attention, random but
valid), starts ``studio ui`` on tiny as a separate process, and then:

1. alone: every request once, one at a time from one client (the reference images, and a warm-up);
2. together: 8 users (one client each, in threads), 10 requests each, all at once; repeated ``--rounds`` times
   (default 5) so that the RSS after each round shows whether memory keeps growing.

It prints, per phase, requests per second and latency; that every image of phase 2 equals the one the same request
gave alone (max absolute pixel difference, 0 means identical bytes); and the server's RSS (UI process, where
generation runs, and the job worker) sampled every 0.2 s: after phase 1, its peak during phase 2, and at the end.
Exits non-zero if a request fails or an image differs by more than ``--tolerance``. ``--threads`` sets the server's
OMP_NUM_THREADS (default 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from studio.adapter_files import AdapterFile, AdapterMetadata  # noqa: E402
from studio.home import StudioHome  # noqa: E402
from studio.library import AdapterLibrary  # noqa: E402
from ui.process import UIProcess, free_port  # noqa: E402

ADAPTER_HEADERS = ["adapter", "weight", "truncation", "strength", "region"]
# One adapter set per user: single adapters, weights other than 1, and mixes of LoRAs and embeddings.
USER_SETS: list[list[tuple[str, float]]] = [
    [("lora-0", 1.0)],
    [("lora-1", 0.7)],
    [("ti-0", 1.0)],
    [("ti-1", 1.0)],
    [("lora-0", 0.5), ("ti-2", 1.0)],
    [("lora-2", 0.8), ("lora-3", 0.6)],
    [("ti-3", 1.0), ("lora-1", 1.0)],
    [("lora-3", 1.0), ("ti-0", 1.0), ("ti-1", 1.0)],
]
PROMPTS = ["a red circle on a blue background", "a green square", "a yellow triangle on a black background"]


# -- adapters ---------------------------------------------------------------------------------------------------------


def build_adapters(home: StudioHome, rank: int = 4) -> dict[str, str]:
    """Add 4 embeddings and 4 LoRAs for tiny to the library; returns adapter name -> placeholder token ('' for LoRA)."""
    from studio.base_models import load_base_model

    base = load_base_model("tiny")
    library = AdapterLibrary(home)
    tokens: dict[str, str] = {}
    embeddings = base.pipeline.text_encoder.get_input_embeddings().weight
    for index in range(4):
        generator = torch.Generator().manual_seed(100 + index)
        # Rows of the size real token embeddings have, so the prompt stays in the text encoder's range.
        row = torch.randn(1, embeddings.shape[1], generator=generator) * float(embeddings.detach().std())
        token = f"<ti-{index}>"
        metadata = AdapterMetadata(
            kind="textual_inversion",
            family=base.family.name,
            base_model="tiny",
            base_fingerprint=base.fingerprint,
            placeholder_tokens=[token],
        )
        library.add(AdapterFile({"emb_params": row}, metadata), f"ti-{index}")
        tokens[f"ti-{index}"] = token
    for index in range(4):
        generator = torch.Generator().manual_seed(200 + index)
        tensors = {}
        for name, module in base.pipeline.unet.named_modules():
            if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(module, torch.nn.Linear):
                key = base.family.kohya_unet_key(name)
                tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
                tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
                tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        metadata = AdapterMetadata(
            kind="lora", family=base.family.name, base_model="tiny", base_fingerprint=base.fingerprint
        )
        library.add(AdapterFile(tensors, metadata), f"lora-{index}")
        tokens[f"lora-{index}"] = ""
    return tokens


# -- requests ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    user: int
    index: int
    prompt: str
    seed: int
    adapters: list[tuple[str, float]]

    def args(self, steps: int, size: int) -> tuple:
        table = {"headers": ADAPTER_HEADERS, "data": [[n, w, "", "", ""] for n, w in self.adapters], "metadata": None}
        return (self.prompt, "", self.seed, 1, steps, 7.5, size, size, "default", table, "none")


def plan(users: int, per_user: int, tokens: dict[str, str]) -> list[Request]:
    requests = []
    for user in range(users):
        adapters = USER_SETS[user % len(USER_SETS)]
        trigger = " ".join(tokens[name] for name, _ in adapters if tokens[name])
        for index in range(per_user):
            prompt = PROMPTS[(user + index) % len(PROMPTS)]
            prompt = f"a photo of {trigger}, {prompt}" if trigger else prompt
            requests.append(Request(user, index, prompt, seed=1000 * user + index, adapters=adapters))
    return requests


def image_of(gallery: list) -> np.ndarray:
    """The pixels of the one image a /generate call returned (the client downloaded the file)."""
    [item] = gallery
    path = item.get("image") if isinstance(item, dict) else item[0]
    if isinstance(path, dict):
        path = path.get("path")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@dataclass
class Phase:
    name: str
    images: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def report(self) -> str:
        count = len(self.latencies)
        lat = sorted(self.latencies)
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan")
        return (
            f"{self.name}: {count} requests in {self.wall_s:.1f}s = {count / self.wall_s:.2f} requests/s; "
            f"latency median {statistics.median(lat) if lat else float('nan'):.2f}s, p95 {p95:.2f}s, "
            f"max {max(lat) if lat else float('nan'):.2f}s; server CPU {self.server_cpu_s / max(count, 1):.2f}s per "
            f"request; errors {len(self.errors)}"
        )


def run_requests(client, requests: list[Request], phase: Phase, steps: int, size: int, lock: threading.Lock) -> None:
    for request in requests:
        start = time.perf_counter()
        try:
            gallery, _ = client.predict(*request.args(steps, size), api_name="/generate")
            pixels = image_of(gallery)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every failed request and goes on
            with lock:
                phase.errors.append(f"user {request.user} request {request.index}: {type(exc).__name__}: {exc}")
            continue
        elapsed = time.perf_counter() - start
        with lock:
            phase.images[(request.user, request.index)] = pixels
            phase.latencies.append(elapsed)


# -- memory -----------------------------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Samples the RSS of the UI process and of the job worker every ``every_s`` seconds."""

    def __init__(self, server: UIProcess, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.every_s = every_s
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, int, int]] = []  # (time, ui rss, worker rss)

    def rss(self) -> tuple[int, int]:
        values = []
        for pid in (self.server.process.pid, self.server.worker_pid()):
            try:
                values.append(psutil.Process(pid).memory_info().rss if pid else 0)
            except psutil.NoSuchProcess:
                values.append(0)
        return values[0], values[1]

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append((time.monotonic(), *self.rss()))
            self.stop_event.wait(self.every_s)

    def cpu_s(self) -> float:
        """CPU seconds the UI process (where generation runs) has used so far."""
        times = psutil.Process(self.server.process.pid).cpu_times()
        return times.user + times.system

    def peak(self, since: float, until: float) -> tuple[int, int]:
        window = [s for s in self.samples if since <= s[0] <= until] or self.samples[-1:]
        return max(s[1] for s in window), max(s[2] for s in window)


def mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


# -- main -------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10, help="requests per user")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per image")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (tiny's native size is 64)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the concurrent phase")
    parser.add_argument("--tolerance", type=int, default=1, help="largest allowed pixel difference (0..255)")
    # One thread by default: on a CPU shared with other work, OpenMP threads spin-waiting on each other multiply the
    # CPU a request costs.
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of the server")
    args = parser.parse_args(argv)
    from gradio_client import Client

    with tempfile.TemporaryDirectory(prefix="load-ui-") as folder:
        root = Path(folder)
        home = StudioHome(root / "home").ensure()
        started = time.perf_counter()
        tokens = build_adapters(home)
        print(f"adapters: {', '.join(sorted(tokens))} built in {time.perf_counter() - started:.1f}s")
        requests = plan(args.users, args.requests, tokens)

        env = {"OMP_NUM_THREADS": args.threads}
        server = UIProcess.start(home, port=free_port(), log_path=root / "ui.log", env=env)
        sampler = RssSampler(server)
        sampler.start()
        lock = threading.Lock()
        try:
            print(f"studio ui on tiny at {server.url} (pid {server.process.pid}, worker {server.worker_pid()})")
            ui_rss, worker_rss = sampler.rss()
            print(f"RSS at start: UI {mib(ui_rss)}, worker {mib(worker_rss)}")

            # 1. Alone: one client, one request at a time.
            alone = Phase("alone (1 client, sequential)")
            t0, cpu0 = time.perf_counter(), sampler.cpu_s()
            run_requests(Client(server.url, verbose=False), requests, alone, args.steps, args.size, lock)
            alone.wall_s, alone.server_cpu_s = time.perf_counter() - t0, sampler.cpu_s() - cpu0
            ui_rss, worker_rss = sampler.rss()
            print(alone.report())
            print(f"RSS after phase 1: UI {mib(ui_rss)}, worker {mib(worker_rss)}")

            # 2. Together: one client (one session) per user, all users at once; the same users for several rounds, to
            #    see whether memory settles.
            clients = [Client(server.url, verbose=False) for _ in range(args.users)]
            rounds = []
            for round_index in range(1, args.rounds + 1):
                together = Phase(f"together, round {round_index} ({args.users} clients, concurrent)")
                threads = [
                    threading.Thread(
                        target=run_requests,
                        args=(clients[u], [r for r in requests if r.user == u], together, args.steps, args.size, lock),
                    )
                    for u in range(args.users)
                ]
                t0, cpu0, since = time.perf_counter(), sampler.cpu_s(), time.monotonic()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                together.wall_s, together.server_cpu_s = time.perf_counter() - t0, sampler.cpu_s() - cpu0
                peak_ui, peak_worker = sampler.peak(since, time.monotonic())
                ui_rss, worker_rss = sampler.rss()
                print(together.report())
                print(
                    f"  RSS during the round: UI peak {mib(peak_ui)}, end {mib(ui_rss)}; "
                    f"worker peak {mib(peak_worker)}, end {mib(worker_rss)}"
                )
                rounds.append(together)
            time.sleep(1.0)
            ui_rss, worker_rss = sampler.rss()
            peak_ui, peak_worker = sampler.peak(0.0, time.monotonic())
            print(f"RSS peak over the run: UI {mib(peak_ui)}, worker {mib(peak_worker)}")
            print(f"RSS at the end: UI {mib(ui_rss)}, worker {mib(worker_rss)}")
        finally:
            sampler.stop_event.set()
            server.stop()

    # 3. Every image made under load equals the one the same request gave alone.
    errors = alone.errors + [e for r in rounds for e in r.errors]
    for message in errors[:5]:
        print(f"error: {message}")
    ok = not errors
    for together in rounds:
        keys = sorted(set(alone.images) & set(together.images))
        differences = [int(np.abs(alone.images[k] - together.images[k]).max()) for k in keys]
        identical = sum(d == 0 for d in differences)
        worst = max(differences) if differences else -1
        print(
            f"{together.name}: images compared with alone {len(keys)} of {len(requests)}; identical {identical}; "
            f"max abs pixel difference {worst}"
        )
        ok = ok and len(keys) == len(requests) and worst <= args.tolerance
    distinct = len({pixels.tobytes() for pixels in alone.images.values()})
    print(f"distinct images among the {len(alone.images)} requests: {distinct}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

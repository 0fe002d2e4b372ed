"""The ``studio`` command line.

>>> main(["adapters", "list", "--json"])  # doctest: +SKIP
[]

Every subcommand's work lives elsewhere; this module parses arguments, resolves the studio home and dispatches by
importing the implementing module only when its command runs, so ``studio --help`` stays fast. A command whose
module does not exist yet answers "not available yet" with exit status 3.

Exit status: 0 on success; a `StudioError`'s ``exit_code`` (2 for bad input, 3 for "not available") with one line
``error: <message>`` on stderr; 2 for usage errors (argparse); 130 on Ctrl-C; 1 for an unexpected internal error,
whose traceback is shown only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from studio.errors import InvalidInputError, NotAvailableError, StudioError
from studio.home import StudioHome, resolve_home

logger = logging.getLogger(__name__)

# CLI method name -> module in trainers/ that implements `train_from_cli(args, home) -> int`.
TRAIN_METHODS = {
    "dreambooth": "trainers.dreambooth",
    "textual-inversion": "trainers.textual_inversion",
    "neti": "trainers.neti",
    "preference": "trainers.preference",
}
EXPORT_FORMATS = ("kohya", "diffusers", "a1111")
INTERNAL_ERROR_EXIT = 1
INTERRUPTED_EXIT = 130

Handler = Callable[[argparse.Namespace, StudioHome], int]


# -- handlers ---------------------------------------------------------------------------------------------------------


def _train(args: argparse.Namespace, home: StudioHome) -> int:
    if not args.resume and not args.name:
        raise InvalidInputError("expected --name NAME for the trained adapter (or --resume RUN), found neither")
    if getattr(args, "queue", False):
        # Queued runs are checked and stored now and trained by the background worker (studio.jobs).
        return _entry("studio.jobs", "submit_from_cli", "studio train --queue")(args, home)
    run = _entry(TRAIN_METHODS[args.method], "train_from_cli", f"studio train {args.method}")
    return run(args, home)


def _generate(args: argparse.Namespace, home: StudioHome) -> int:
    return _entry("pipelines.cli", "generate_from_cli", "studio generate")(args, home)


def _jobs(args: argparse.Namespace, home: StudioHome) -> int:
    return _entry("studio.jobs", "jobs_from_cli", "studio jobs")(args, home)


def _ui(args: argparse.Namespace, home: StudioHome) -> int:
    return _entry("ui.app", "launch_from_cli", "studio ui")(args, home)


def _demo(args: argparse.Namespace, home: StudioHome) -> int:
    return _entry("studio.demo", "run_demo_from_cli", "studio demo")(args, home)


def _adapters(args: argparse.Namespace, home: StudioHome) -> int:
    library_module = _module("studio.library", "studio adapters")
    library = library_module.AdapterLibrary(home)
    if args.action == "list":
        infos = library.list()
        if args.json:
            _print_json([_plain(info) for info in infos])
        elif not infos:
            print(f"no adapters in {home.adapters}")
        else:
            _print_table([_plain(info) for info in infos])
    elif args.action == "show":
        info = _plain(library.show(args.name))
        if args.json:
            _print_json(info)
        else:
            for key, value in info.items():
                print(f"{key}: {_text(value)}")
    elif args.action == "import":
        base = None
        if args.base:
            from studio.base_models import load_base_model

            base = load_base_model(args.base)
        result = library.import_file(Path(args.file), name=args.name, base=base)
        name = getattr(result, "name", result)
        print(f"imported {args.file} as '{name}'")
    elif args.action == "export":
        for path in library.export(args.name, args.format, Path(args.out)):
            print(path)
    elif args.action == "remove":
        library.remove(args.name)
        print(f"removed '{args.name}'")
    return 0


def _check(args: argparse.Namespace, home: StudioHome) -> int:
    """Self-check: the packages import and a tiny random pipeline denoises; prints OK."""
    import diffusers
    import torch
    import transformers

    for package in ("studio", "trainers", "pipelines", "ui", "peft", "safetensors", "accelerate"):
        importlib.import_module(package)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")

    from studio.families import detect_family
    from studio.testing import build_tiny_sd1_pipeline

    started = time.perf_counter()
    pipe = build_tiny_sd1_pipeline(seed=0)
    images = pipe(
        "a red circle on a white background",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    elapsed = time.perf_counter() - started
    if images.shape != (1, 64, 64, 3) or not bool(torch.isfinite(torch.from_numpy(images)).all()):
        raise StudioError(f"self-check failed: expected one finite 64x64 RGB image, found shape {images.shape}")
    family = detect_family(pipe)
    print(f"tiny random {family.label} pipeline: 2 denoising steps at 64x64 in {elapsed:.1f}s")
    print(f"studio home: {home.root}")
    print("OK")
    return 0


# -- dispatch helpers -------------------------------------------------------------------------------------------------


def _module(name: str, feature: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only the feature's own module missing means "not built yet"; a missing dependency inside it is a real error.
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise NotAvailableError(f"{feature} is not available yet") from exc
        raise


def _entry(module_name: str, function: str, feature: str) -> Handler:
    function_object = getattr(_module(module_name, feature), function, None)
    if function_object is None:
        raise NotAvailableError(f"{feature} is not available yet")
    return function_object


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False, default=str))


def _text(value: Any) -> str:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def _print_table(rows: list[Any]) -> None:
    columns = [column for column in ("name", "kind", "family", "base_model", "created") if column in rows[0]]
    if not columns:
        for row in rows:
            print(_text(row))
        return
    cells = [[_text(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    print("  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True)).rstrip())
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


# -- parser -----------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``studio`` command (also used to document the CLI)."""
    # --home and --verbose work before or after the subcommand. Parent parsers share their action objects, so a
    # default would let the subcommand's parser overwrite a value given before it: SUPPRESS, and fill in in main().
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home", default=argparse.SUPPRESS, help="studio home folder (else $STUDIO_HOME, else ./studio-home)"
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress; show tracebacks"
    )

    parser = argparse.ArgumentParser(
        prog="studio",
        description="Personalization Studio: teach a text-to-image model your own subjects, styles and taste.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    # train
    train = commands.add_parser("train", parents=[common], help="train an adapter from a folder of images")
    train.add_argument("method", choices=list(TRAIN_METHODS), metavar="METHOD", help=", ".join(TRAIN_METHODS))
    train.add_argument("--images", metavar="DIR", help="folder of training images (captions in .txt files beside them)")
    train.add_argument("--name", metavar="NAME", help="library name of the trained adapter")
    train.add_argument("--base", metavar="MODEL", default="tiny", help="base model: tiny, a folder, a file or a hub id")
    train.add_argument("--config", metavar="FILE.toml", help="training config file")
    train.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[], help="override one config value (repeatable)"
    )
    train.add_argument("--resume", metavar="RUN", help="resume an interrupted run (run folder or job id)")
    train.add_argument("--queue", action="store_true", help="queue the run as a background job instead of running now")
    method = train.add_argument_group("method options")
    method.add_argument("--token", metavar="TOKEN", help="trigger word / placeholder token (e.g. sks, <my-cat>)")
    method.add_argument("--class-noun", metavar="NOUN", help="DreamBooth class noun for prior preservation (e.g. dog)")
    method.add_argument("--init-word", metavar="WORD", help="textual inversion: word the embedding starts from")
    method.add_argument("--super-category", metavar="WORD", help="NeTI: super-category word (e.g. toy)")
    method.add_argument("--pairs", metavar="FILE", help="preference: file of preference pairs")
    method.add_argument("--user", metavar="USER", help="preference: user whose pairs to train on")
    method.add_argument("--num-vectors", type=_positive_int, metavar="N", help="textual inversion: vectors per token")
    train.set_defaults(handler=_train)

    # generate
    generate = commands.add_parser("generate", parents=[common], help="generate images, with adapters")
    generate.add_argument("--prompt", required=True, metavar="TEXT")
    generate.add_argument("--negative", metavar="TEXT", help="negative prompt")
    generate.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME[:WEIGHT][,KEY=VALUE]",
        help="adapter from the library, e.g. my-dog:0.8 or neti-cat:truncation=8,encode_steps=3 (repeatable; NeTI "
        "truncation: 1 to the mapper's width, default the full width (32 on tiny, 128 elsewhere), lower follows the "
        "prompt more; encode_steps: the text encoder runs exactly at this many timesteps of the grid, its ends "
        "included, the others blend them; 0 = every timestep; default 2)",
    )
    generate.add_argument("--base", metavar="MODEL", default="tiny", help="base model (default: tiny)")
    generate.add_argument("--seed", type=int, metavar="N")
    generate.add_argument("--steps", type=_positive_int, metavar="N", help="denoising steps")
    generate.add_argument("--guidance", type=float, metavar="F", help="classifier-free guidance scale")
    generate.add_argument("--num-images", type=_positive_int, default=1, metavar="N")
    generate.add_argument("--width", type=_positive_int, metavar="PX")
    generate.add_argument("--height", type=_positive_int, metavar="PX")
    generate.add_argument("--scheduler", metavar="NAME", help="sampler, e.g. ddim, euler, dpm++")
    generate.add_argument(
        "--regions",
        metavar="LAYOUT",
        help="columns or rows: one stripe per BREAK-separated part of the prompt (regional prompting)",
    )
    generate.add_argument(
        "--base-ratio", type=float, metavar="F", help="with --regions: weight of the part before ADDBASE (0.2)"
    )
    generate.add_argument(
        "--region-mode",
        metavar="MODE",
        help="with --regions: attention (default; one U-Net pass) or latent (one U-Net view per region; a LoRA "
        "takes a region with --adapter NAME:1,region=N; make the image about one native side per region wide)",
    )
    generate.add_argument("--out", metavar="PATH", help="output image or folder (default: <home>/outputs)")
    generate.set_defaults(handler=_generate)

    # adapters
    adapters = commands.add_parser("adapters", parents=[common], help="the adapter library")
    actions = adapters.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[common], help="list adapters")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = actions.add_parser("show", parents=[common], help="show an adapter's metadata")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="print JSON")
    importing = actions.add_parser("import", parents=[common], help="import an adapter file (ours, kohya, A1111, ...)")
    importing.add_argument("file", metavar="FILE")
    importing.add_argument("--name", metavar="NAME", help="library name (default: from the file name)")
    importing.add_argument("--base", metavar="MODEL", help="check shapes and family against this base model")
    export = actions.add_parser("export", parents=[common], help="export an adapter for other tools")
    export.add_argument("name", metavar="NAME")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", required=True, metavar="PATH")
    remove = actions.add_parser("remove", parents=[common], help="remove an adapter")
    remove.add_argument("name", metavar="NAME")
    adapters.set_defaults(handler=_adapters)

    # jobs
    jobs = commands.add_parser("jobs", parents=[common], help="the background job queue")
    job_actions = jobs.add_subparsers(dest="action", metavar="ACTION", required=True)
    job_list = job_actions.add_parser("list", parents=[common], help="list jobs")
    job_list.add_argument("--json", action="store_true", help="print JSON")
    job_show = job_actions.add_parser("show", parents=[common], help="show a job")
    job_show.add_argument("id", metavar="ID")
    job_show.add_argument("--json", action="store_true", help="print JSON")
    for action, text in (("cancel", "cancel a queued or running job"), ("resume", "resume an interrupted job")):
        job_action = job_actions.add_parser(action, parents=[common], help=text)
        job_action.add_argument("id", metavar="ID")
    jobs.set_defaults(handler=_jobs)

    # ui
    ui = commands.add_parser("ui", parents=[common], help="start the web UI")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ui.add_argument("--port", type=_positive_int, default=7860, help="port (default: 7860)")
    ui.add_argument("--auth", metavar="USER:PASSWORD", help="require this login")
    ui.set_defaults(handler=_ui)

    # demo
    demo = commands.add_parser("demo", parents=[common], help="run the end-to-end demo on the embedded tiny model")
    demo.add_argument("--out", metavar="DIR", help="where to write the demo's contact sheet (a folder or a .png path)")
    demo.add_argument(
        "--concept", default="robot-toy", help="shipped concept to learn: robot-toy, hex-emblem, crescent-moon"
    )
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.set_defaults(handler=_demo)

    # check
    check = commands.add_parser("check", parents=[common], help="self-check: imports and a 2-step tiny generation")
    check.set_defaults(handler=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``studio`` command and return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # --help (0) and usage errors (2): argparse has printed its message already.
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    # The shared options have no defaults (see build_parser): absent means not given anywhere.
    args.home = getattr(args, "home", None)
    args.verbose = getattr(args, "verbose", False)
    if not args.verbose:
        # Library advisories (e.g. transformers noting torchvision is absent) would bury the command's own output.
        # Set before the lazily imported libraries read it; an explicit setting by the user wins.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        home = resolve_home(args.home)
        return int(args.handler(args, home) or 0)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        else:
            message = " ".join(str(exc).split())
            print(
                f"error: internal error: {type(exc).__name__}: {message} (run with --verbose for details)",
                file=sys.stderr,
            )
        return INTERNAL_ERROR_EXIT


if __name__ == "__main__":
    raise SystemExit(main())

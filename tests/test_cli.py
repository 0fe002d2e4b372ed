"""The `studio` command: subcommands, JSON output, exit statuses and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import studio.cli as cli
from studio.cli import main
from studio.errors import NotFoundError

SUBCOMMANDS = ("train", "generate", "adapters", "jobs", "ui", "demo", "check")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_subcommands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in SUBCOMMANDS:
        assert command in out


def test_generate_help_names_the_neti_options(capsys):
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps the help text
    assert "truncation=8,encode_steps=3" in text and "0 = every timestep" in text
    assert "32 on tiny" in text, "the example and the range fit the default base model"


def test_console_entry_point_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "studio.cli", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "adapters" in result.stdout and "generate" in result.stdout


def test_documented_spellings_parse():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["train", "textual-inversion", "--images", "imgs", "--name", "cat", "--base", "tiny", "--config", "c.toml"]
        + ["--set", "steps=10", "--set", "lr=1e-4", "--token", "<cat>", "--init-word", "cat", "--num-vectors", "2"]
    )
    assert (args.method, args.images, args.name, args.set, args.num_vectors) == (
        "textual-inversion",
        "imgs",
        "cat",
        ["steps=10", "lr=1e-4"],
        2,
    )
    args = parser.parse_args(
        [
            "generate",
            "--prompt",
            "a cat",
            "--negative",
            "blurry",
            "--adapter",
            "cat:0.8",
            "--adapter",
            "neti:truncation=64,encode_steps=3",
        ]
        + ["--seed", "3", "--steps", "4", "--guidance", "5.5", "--num-images", "2", "--out", "o.png"]
    )
    assert args.adapter == ["cat:0.8", "neti:truncation=64,encode_steps=3"]
    from pipelines import AdapterRef

    assert [AdapterRef.parse(text).options for text in args.adapter] == [{}, {"truncation": 64.0, "encode_steps": 3.0}]
    assert (args.seed, args.steps, args.guidance, args.num_images) == (3, 4, 5.5, 2)
    args = parser.parse_args(["adapters", "export", "cat", "--format", "kohya", "--out", "x.safetensors"])
    assert (args.action, args.name, args.format, args.out) == ("export", "cat", "kohya", "x.safetensors")
    assert parser.parse_args(["jobs", "resume", "7"]).id == "7"
    assert parser.parse_args(["ui", "--port", "8000", "--auth", "me:pw"]).port == 8000
    assert parser.parse_args(["demo", "--out", "d"]).out == "d"


def test_home_option_works_before_and_after_the_subcommand(capsys, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cli, "_check", lambda args, home: seen.append(home.root) or 0)
    assert main(["--home", str(tmp_path / "a"), "check"]) == 0
    assert main(["check", "--home", str(tmp_path / "b")]) == 0
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "c"))
    assert main(["check"]) == 0
    assert [path.name for path in seen] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("argv", "module", "feature"),
    [
        (["train", "dreambooth", "--images", "x", "--name", "n"], "trainers.dreambooth", "studio train dreambooth"),
        (["generate", "--prompt", "p"], "pipelines.cli", "studio generate"),
        (["jobs", "list", "--json"], "studio.jobs", "studio jobs"),
        (["ui"], "ui.app", "studio ui"),
        (["demo"], "studio.demo", "studio demo"),
        (["adapters", "list", "--json"], "studio.library", "studio adapters"),
    ],
)
def test_features_that_do_not_exist_yet_say_so_and_fail(capsys, monkeypatch, home, argv, module, feature):
    # Hide the feature's module, whether or not it has been written by now.
    monkeypatch.setitem(sys.modules, module, None)
    code, out, err = run(capsys, "--home", str(home.root), *argv)
    assert code == 3
    assert err == f"error: {feature} is not available yet\n"
    assert out == ""


def test_a_missing_dependency_inside_a_feature_is_not_reported_as_not_available(monkeypatch, tmp_path):
    (tmp_path / "feature_with_broken_import.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        cli._entry("feature_with_broken_import", "run", "feature")


def test_train_without_a_name_is_a_one_line_error(capsys, home):
    code, _, err = run(capsys, "--home", str(home.root), "train", "neti", "--images", "x")
    assert code == 2
    assert err.startswith("error: expected --name NAME") and err.count("\n") == 1


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "train", "finetune-everything")[0] == 2
    assert run(capsys, "generate", "--prompt", "x", "--steps", "0")[0] == 2
    assert run(capsys)[0] == 2


def test_unexpected_errors_are_one_line_unless_verbose(capsys, monkeypatch):
    def broken(args, home):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "_check", broken)
    code, _, err = run(capsys, "check")
    assert code == 1
    assert err == "error: internal error: RuntimeError: something broke (run with --verbose for details)\n"
    code, _, err = run(capsys, "check", "--verbose")
    assert code == 1
    assert "Traceback" in err and "RuntimeError: something" in err


def test_ctrl_c_exits_130(capsys, monkeypatch):
    def interrupted(args, home):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_check", interrupted)
    assert run(capsys, "check")[0] == 130


def test_check_runs_a_tiny_generation_and_prints_ok(capsys, home):
    code, out, err = run(capsys, "--home", str(home.root), "check")
    assert code == 0, err
    assert out.rstrip().endswith("OK")
    assert "2 denoising steps" in out


# -- adapters, against a stand-in library with the documented API --------------------------------------------------


@dataclass
class FakeInfo:
    name: str
    kind: str
    family: str
    path: Path


class FakeLibrary:
    calls: list = []

    def __init__(self, home) -> None:
        self.home = home

    def list(self):
        return [FakeInfo("cat", "lora", "sd1", Path("/x/cat.safetensors"))] if self.home.root.name == "full" else []

    def show(self, name):
        if name != "cat":
            raise NotFoundError(f"no adapter named '{name}'")
        return FakeInfo("cat", "lora", "sd1", Path("/x/cat.safetensors"))

    def import_file(self, path, name=None, base=None):
        FakeLibrary.calls.append(("import", path, name, base))
        return FakeInfo(name or path.stem, "lora", "sd1", path)

    def export(self, name, fmt, out):
        FakeLibrary.calls.append(("export", name, fmt, out))
        return [out]

    def remove(self, name):
        FakeLibrary.calls.append(("remove", name))


@pytest.fixture
def fake_library(monkeypatch):
    module = types.ModuleType("studio.library")
    module.AdapterLibrary = FakeLibrary
    monkeypatch.setitem(sys.modules, "studio.library", module)
    FakeLibrary.calls = []
    return FakeLibrary


def test_adapters_commands_print_json_and_call_the_library(capsys, tmp_path, fake_library):
    empty, full = str(tmp_path / "empty"), str(tmp_path / "full")
    code, out, _ = run(capsys, "--home", empty, "adapters", "list", "--json")
    assert (code, json.loads(out)) == (0, [])
    code, out, _ = run(capsys, "--home", full, "adapters", "list", "--json")
    assert json.loads(out) == [{"name": "cat", "kind": "lora", "family": "sd1", "path": "/x/cat.safetensors"}]
    code, out, _ = run(capsys, "--home", full, "adapters", "list")
    assert out.splitlines()[0].split() == ["NAME", "KIND", "FAMILY"] and "cat" in out
    code, out, _ = run(capsys, "--home", full, "adapters", "show", "cat", "--json")
    assert json.loads(out)["kind"] == "lora"
    code, out, _ = run(capsys, "--home", full, "adapters", "import", "/tmp/dog.safetensors", "--name", "dog")
    assert code == 0 and "'dog'" in out
    code, out, _ = run(capsys, "--home", full, "adapters", "export", "cat", "--format", "a1111", "--out", "e.pt")
    assert code == 0 and out.strip() == "e.pt"
    assert run(capsys, "--home", full, "adapters", "remove", "cat")[0] == 0
    assert fake_library.calls == [
        ("import", Path("/tmp/dog.safetensors"), "dog", None),
        ("export", "cat", "a1111", Path("e.pt")),
        ("remove", "cat"),
    ]


def test_library_errors_are_one_line_with_the_error_exit_status(capsys, home, fake_library):
    code, out, err = run(capsys, "--home", str(home.root), "adapters", "show", "dog", "--json")
    assert (code, out, err) == (2, "", "error: no adapter named 'dog'\n")


def test_adapters_list_json_on_an_empty_home_with_the_real_library(capsys, home):
    pytest.importorskip("studio.library")
    code, out, err = run(capsys, "--home", str(home.root), "adapters", "list", "--json")
    assert code == 0, err
    assert json.loads(out) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "neti", "--token", "<my-toy>", "--super-category", "toy"],
        ["train", "dreambooth", "--token", "sks", "--class-noun", "toy"],
        ["train", "textual-inversion", "--token", "<my-toy>", "--init-word", "toy"],
    ],
)
def test_a_mistyped_images_folder_is_a_one_line_error_that_leaves_no_run_behind(capsys, home, tmp_path, argv):
    missing = tmp_path / "phtos"
    code, _, err = run(capsys, "--home", str(home.root), *argv, "--images", str(missing), "--name", "toy")
    assert code != 0
    assert err == f"error: image folder {missing} does not exist or is not a folder\n"
    assert not home.runs.exists() or not any(home.runs.iterdir())

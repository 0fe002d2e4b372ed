"""Build the CLIP BPE tokenizer files (vocab.json, merges.txt) from open_clip's vocabulary file.

The 49,408-token CLIP vocabulary is fully determined by ``bpe_simple_vocab_16e6.txt.gz``, which the
``open_clip_torch`` package ships. We derive the Hugging Face ``CLIPTokenizer`` files from it offline,
so neither the tests nor the embedded ``tiny`` model ever fetch a tokenizer from a hub.

Usage::

    pip download --no-deps open_clip_torch -d /tmp/oc
    python scripts/make_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl studio/assets/clip_tokenizer
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import zipfile
from pathlib import Path

# The merges used by CLIP: the file's first line is a header, then 49152 - 256 - 2 merges.
N_MERGES = 49152 - 256 - 2


def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def read_bpe_text(source: Path) -> str:
    """Read the gzipped vocabulary, either directly or from inside an open_clip wheel."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
        return gzip.GzipFile(fileobj=io.BytesIO(raw)).read().decode("utf-8")
    return gzip.open(source, "rt", encoding="utf-8").read()


def build(source: Path, out_dir: Path) -> None:
    lines = read_bpe_text(source).split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    base = list(byte_to_unicode().values())
    vocab = base + [token + "</w>" for token in base]
    vocab += ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))

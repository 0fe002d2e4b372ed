"""Preference pairs: the per-user store and Pick-a-Pic import (JSONL and parquet), bad rows reported per row."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from studio.errors import InvalidInputError, NotFoundError
from studio.preferences import PreferenceStore, import_pick_a_pic, load_pairs, read_pick_a_pic


def colour(name: str) -> Image.Image:
    return Image.new("RGB", (16, 16), name)


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_store_keeps_each_users_choices_and_skips_ties(home):
    store = PreferenceStore(home)
    store.add("alice", "a circle", preferred=colour("red"), other=colour("blue"))
    assert store.add_choice("alice", "a square", (colour("green"), colour("black")), choice=1) is not None
    assert store.add_choice("alice", "a star", (colour("green"), colour("black")), choice=None) is None
    store.add("bob", "a ring", preferred=colour("white"), other=colour("gray"))

    assert store.users() == ["alice", "bob"]
    pairs = store.pairs("alice")
    assert [p.prompt for p in pairs] == ["a circle", "a square"]
    assert same(pairs[0].preferred, colour("red")) and same(pairs[1].preferred, colour("black"))
    # No temporary files are left behind by the atomic writes.
    assert not [p for p in (home.preferences / "alice").rglob(".*")]
    assert len(load_pairs(home.preferences)) == 3
    assert len(load_pairs(home.preferences / "bob")) == 1
    with pytest.raises(NotFoundError, match="carol"):
        store.pairs("carol")
    with pytest.raises(InvalidInputError, match="user id"):
        store.add("../evil", "x", preferred=colour("red"), other=colour("blue"))


def test_jsonl_import_reports_bad_rows_and_keeps_valid_ones(home, tmp_path):
    colour("red").save(tmp_path / "a.png")
    colour("blue").save(tmp_path / "b.png")
    rows = [
        {"user_id": 7, "caption": "a circle", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1, "label_1": 0},
        {"user_id": 7, "caption": "a square", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 0, "label_1": 1},
        {"user_id": 7, "caption": "a tie", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 0.5, "label_1": 0.5},
        {"user_id": 8, "caption": "gone", "jpg_0": "missing.png", "jpg_1": "b.png", "label_0": 1, "label_1": 0},
        {"user_id": 8, "caption": "odd label", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 0.7, "label_1": 0.3},
        {"user": "x", "caption": "no user", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1, "label_1": 0},
    ]
    path = tmp_path / "picks.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")

    pairs, report = read_pick_a_pic(path)
    assert [p.prompt for p in pairs] == ["a circle", "a square"]
    assert same(pairs[0].preferred, colour("red")) and same(pairs[1].preferred, colour("blue"))
    assert report.ties == 1 and report.imported == 2 and report.users == {"7": 2}
    problems = {p.row: p.message for p in report.problems}
    assert sorted(problems) == [4, 5, 6, 7]
    assert "missing.png" in problems[4] and "does not exist" in problems[4]
    assert "label_0" in problems[5] and "0.7" in problems[5]
    assert "'user_id'" in problems[6] and "'user'" in problems[6]
    assert "JSON" in problems[7]
    assert all("\n" not in str(p) for p in report.problems)

    store = PreferenceStore(home)
    assert import_pick_a_pic(store, path).imported == 2
    assert store.count("7") == 2
    with pytest.raises(NotFoundError, match="'9'"):
        read_pick_a_pic(path, user="9")


def test_parquet_import(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    def png(name: str) -> bytes:
        buffer = io.BytesIO()
        colour(name).save(buffer, format="PNG")
        return buffer.getvalue()

    table = pa.table(
        {
            "user_id": [1, 1, 2],
            "caption": ["a circle", "a square", "broken"],
            "jpg_0": [png("red"), png("green"), b"not an image"],
            "jpg_1": [png("blue"), png("black"), png("blue")],
            "label_0": [0.0, 0.5, 1.0],
            "label_1": [1.0, 0.5, 0.0],
        }
    )
    path = tmp_path / "picks.parquet"
    pq.write_table(table, path)
    pairs, report = read_pick_a_pic(path)
    assert len(pairs) == 1 and same(pairs[0].preferred, colour("blue")) and pairs[0].user_id == "1"
    assert report.ties == 1
    assert [p.row for p in report.problems] == [3] and "jpg_0" in report.problems[0].message

"""emoji_data.build on tiny fake npm packages (no network; a fake `npm` where one is needed): the categories
layout on emoji-datasource alone, and the refusals before any fetch."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from emoji_data import build as emoji
from emoji_fakes import ENTRIES, HELD, STYLES, TRAIN, fake_npm, files, held_out, make_package, serve_tarballs, write_tgz


@pytest.fixture
def packages(tmp_path):
    return {s: make_package(tmp_path / f"pkg-{s}", s) for s in STYLES}


def test_layout_split_and_compositing(packages, tmp_path):
    out = tmp_path / "emoji"
    m = emoji.build_from_packages(packages, out, version="x")
    t, h = TRAIN.lower(), HELD.lower()
    assert files(out) == {
        f"train/smileys_and_emotion/google_{t}.png", f"train/smileys_and_emotion/twitter_{t}.png",
        f"test/people_and_body/google_{h}.png", f"test/people_and_body/twitter_{h}.png",
        "train/flags/google_1f1fa-1f1f8.png" if not held_out("1F1FA-1F1F8") else "test/flags/google_1f1fa-1f1f8.png",
    }  # Component dropped, no skin tones, no twitter flag
    assert json.loads((out / "categories.json").read_text()) == {
        "flags": "Flags", "people_and_body": "People & Body", "smileys_and_emotion": "Smileys & Emotion"}
    assert m["counts"]["test"]["people_and_body"] == 2 and m["skin_tones"] is False
    assert json.loads((out / "manifest.json").read_text()) == m
    assert "CC-BY 4.0" in m["licences"]["twitter"] and "Apache-2.0" in m["licences"]["google"]
    assert not list(tmp_path.glob("emoji.tmp-*"))
    with Image.open(out / f"train/smileys_and_emotion/twitter_{t}.png") as im:
        assert im.mode == "RGB"
        assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
        assert all(abs(a - b) <= 1 for a, b in zip(im.getpixel((1, 0)), (127, 127, 255)))
        assert im.getpixel((2, 2)) == (255, 0, 0)


def test_skin_tones_follow_base_split(packages, tmp_path):
    out = tmp_path / "emoji"
    m = emoji.build_from_packages(packages, out, skin_tones=True)
    h = HELD.lower()
    for s in STYLES:  # the variation's own code says train; the base's says test
        assert (out / f"test/people_and_body/{s}_{h}-1f3fb.png").is_file()
    assert m["counts"]["test"]["people_and_body"] == 4 and m["skin_tones"] is True


def test_refuses_existing_out_unless_overwrite(packages, tmp_path, capsys):
    out = tmp_path / "emoji"
    (out / "old").mkdir(parents=True)
    with pytest.raises(emoji.EmojiError, match="already exists"):
        emoji.build_from_packages(packages, out)
    assert emoji.main(["--out", str(out)]) == 2  # refused before any fetch
    assert "--overwrite" in capsys.readouterr().err
    emoji.build_from_packages(packages, out, overwrite=True)
    assert not (out / "old").exists() and (out / "train").is_dir()


def test_missing_npm(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    assert emoji.main(["--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "npm not found" in err and "Node.js" in err and "Traceback" not in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_npm_pack_failure_shows_npm_error(tmp_path, monkeypatch, capsys):
    fake_npm(tmp_path, monkeypatch, """echo "npm error code ETARGET" >&2
echo "npm error notarget No matching version found for $2." >&2
echo "npm error A complete log of this run can be found in: /x.log" >&2
exit 1
""")
    assert emoji.main(["--out", str(tmp_path / "out"), "--version", "99.0.0"]) == 2
    err = capsys.readouterr().err
    assert "ETARGET: notarget No matching version found for emoji-datasource-google@99.0.0" in err
    assert err.count("\n") == 1


def test_end_to_end_with_fake_npm(packages, tmp_path, monkeypatch):
    serve_tarballs(tmp_path, monkeypatch, {f"emoji-datasource-{s}": d for s, d in packages.items()})
    cache = tmp_path / "cache"
    assert emoji.main(["--out", str(tmp_path / "out"), "--cache_dir", str(cache), "--layout", "categories",
                       "--styles", "twitter"]) == 0
    assert (cache / "emoji-datasource-twitter-16.0.0.tgz").is_file()
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["version"] == "16.0.0" and m["styles"] == ["twitter"] and "google" not in m["licences"]
    assert files(tmp_path / "out") == {f"train/smileys_and_emotion/twitter_{TRAIN.lower()}.png",
                                       f"test/people_and_body/twitter_{HELD.lower()}.png"}


@pytest.mark.parametrize("members, message", [
    ({"package/README.md": b"hi"}, "no emoji.json"),
    ({"package/emoji.json": json.dumps(ENTRIES).encode()}, "images missing"),
    ({"package/emoji.json": b"[]", "package/img/google/64/a.png": b"x",  # a.png makes the path resolvable
      "package/img/google/64/../../../../../evil.png": b"x"}, "cannot unpack"),
])
def test_bad_tarball(tmp_path, capsys, members, message):
    cache = tmp_path / "cache"
    cache.mkdir()
    write_tgz(cache / "emoji-datasource-google-16.0.0.tgz", members)  # cached: npm is not called
    assert emoji.main(["--out", str(tmp_path / "out"), "--cache_dir", str(cache), "--layout", "categories",
                       "--styles", "google"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.rglob("evil.png")) and not (tmp_path / "out").exists()

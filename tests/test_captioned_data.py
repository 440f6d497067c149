"""Captioned folders (metadata.jsonl at the root): items, classes, alignment, and one line per bad row."""
from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from training.data import captioned_image_folder, has_captions, image_folder

from conftest import make_image_folder


def write_metadata(root, rows, column="text"):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def caption_rows(root, column="text"):
    """One row per image of a make_image_folder tree: '<colour> <shape> <i>'."""
    colour = {"circles": "red", "squares": "green"}
    return [{"file_name": f"{p.parent.name}/{p.name}", column: f"{colour[p.parent.name]} {p.parent.name[:-1]} {p.stem}"}
            for p in sorted(root.glob("*/*.png"))]


@pytest.fixture
def captioned(tmp_path):
    root = make_image_folder(tmp_path / "x", per_class=3)
    write_metadata(root, caption_rows(root))
    return root


def test_class_folders_give_image_class_caption(captioned):
    assert has_captions(captioned) and not has_captions(captioned / "circles")
    ds = captioned_image_folder(captioned, 16)
    plain = image_folder(captioned, 16)  # the same images, classes and order as without captions
    assert ds.classes == plain.classes == ["circles", "squares"]
    assert ds.samples == plain.samples and ds.targets == plain.targets
    assert len(ds) == len(ds.captions) == 6
    for i, (path, target) in enumerate(ds.samples):
        image, label, caption = ds[i]
        assert image.shape == (3, 16, 16) and torch.equal(image, plain[i][0])
        assert label == target and caption == ds.captions[i]
        shape = ds.classes[label][:-1]
        assert caption.split()[1] == shape and caption.split()[2] == path.rsplit("/", 1)[1][:-4]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 16, 16) and list(batch[2]) == ds.captions[:4]


def test_flat_folder_other_column_and_multiple_captions(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for name, rgb in (("b.png", (0, 0, 255)), ("a.jpg", (255, 0, 0))):
        Image.new("RGB", (20, 12), rgb).save(root / name)
    # rows in any order; a second row for one image is a second caption; a blank line is ignored
    write_metadata(root, [{"file_name": "b.png", "caption": "Blue 🟦 box", "extra": 1}, "",
                          {"file_name": "./a.jpg", "caption": "red"}, {"file_name": "b.png", "caption": "azul"}])
    ds = captioned_image_folder(root, 8, caption_column="caption")
    assert ds.classes == [] and ds.targets == [0, 0, 0]
    assert [p.rsplit("/", 1)[1] for p, _ in ds.samples] == ["a.jpg", "b.png", "b.png"]
    assert ds.captions == ["red", "Blue 🟦 box", "azul"]
    image, label, caption = ds[1]
    assert caption == "Blue 🟦 box" and image[2].mean() > 0.9 and image[0].mean() < -0.9


def one_line(root, match, **kw):
    with pytest.raises(ValueError) as e:
        captioned_image_folder(root, 16, **kw)
    msg = str(e.value)
    assert "\n" not in msg and re.search(match, msg), msg
    return msg


@pytest.mark.parametrize("bad_row, match", [
    ('{"file_name": "circles/0.png", "text": "ok"', r"not valid JSON"),
    ('["circles/0.png", "red"]', r"expected a JSON object"),
    ({"file_name": "circles/0.png", "caption": "red"},
     r"caption column 'text' is missing \(columns: file_name, caption\); pass --caption_column"),
    ({"text": "red"}, r"column 'file_name' is missing"),
    ({"file_name": "circles/0.png", "text": ""}, r"caption 'text' of circles/0.png is empty"),
    ({"file_name": "circles/0.png", "text": " \t "}, r"is empty"),
    ({"file_name": "circles/0.png", "text": None}, r"caption 'text' must be a string, got null"),
    ({"file_name": "circles/0.png", "text": ["red", "circle"]}, r"must be a string, got \[\"red\""),
    ({"file_name": 7, "text": "red"}, r"file_name must be a non-empty string"),
    ({"file_name": "circles/99.png", "text": "red"}, r"file_name 'circles/99.png' does not exist"),
    ({"file_name": "../elsewhere.png", "text": "red"}, r"must be a path inside"),
    ({"file_name": "circles", "text": "red"}, r"is not an image file"),
    ({"file_name": "notes.txt", "text": "red"}, r"is not an image file"),
    ({"file_name": "stray.png", "text": "red"}, r"is not inside a class sub-folder \(circles, squares\)"),
])
def test_bad_row_names_file_and_line(captioned, bad_row, match):
    rows = caption_rows(captioned)
    rows.insert(4, bad_row)  # line 5
    write_metadata(captioned, rows)
    (captioned / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(captioned / "stray.png")
    msg = one_line(captioned, match)
    assert msg.startswith(f"{captioned / 'metadata.jsonl'} line 5: "), msg


def test_not_utf8_line(captioned):
    rows = [json.dumps(r).encode() for r in caption_rows(captioned)]
    rows[2] = b'{"file_name": "circles/2.png", "text": "caf\xe9"}'  # latin-1, not UTF-8
    (captioned / "metadata.jsonl").write_bytes(b"\n".join(rows))
    one_line(captioned, r"metadata.jsonl line 3: not UTF-8 text")


def test_images_without_rows_are_refused(captioned):
    rows = caption_rows(captioned)
    write_metadata(captioned, rows[:2] + rows[4:])  # circles/2.png and squares/0.png have no row
    msg = one_line(captioned, r"^2 image\(s\) in .* have no row in metadata.jsonl \(first: circles/2.png\); "
                              r"every image needs a caption")
    assert str(captioned) in msg


def test_empty_metadata_missing_folder_and_bad_image(captioned, tmp_path):
    write_metadata(captioned, [""])
    one_line(captioned, r"metadata.jsonl has no rows")
    one_line(tmp_path / "nowhere", r"does not exist")
    plain = make_image_folder(tmp_path / "plain", per_class=1)
    one_line(plain, r"has no metadata.jsonl")
    # the image check image_folder does runs here too, after the rows are valid
    write_metadata(captioned, caption_rows(captioned))
    (captioned / "squares" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    one_line(captioned, r"unreadable image .*squares/1.png")
    assert len(captioned_image_folder(captioned, 16, check=False)) == 6  # check=False skips decoding only

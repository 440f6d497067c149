"""Fake emoji packages and a fake `npm` for the emoji data builder's tests: tiny emoji-datasource trees,
tarballs, and an `npm` shell script first on PATH."""
from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import zlib
from pathlib import Path

from PIL import Image

STYLES = ("google", "twitter")


def held_out(code: str) -> bool:
    return zlib.crc32(code.encode()) % 100 < 10


def find_code(pred, start=0x1F300) -> str:
    return next(f"{c:X}" for c in range(start, start + 100_000) if pred(f"{c:X}"))


# a base emoji that is held out although its skin variation's own code would not be: proves the
# split follows the BASE code; plus a base that is in train
HELD = find_code(lambda c: held_out(c) and not held_out(f"{c}-1F3FB"))
TRAIN = find_code(lambda c: not held_out(c) and c != HELD)


def entry(unified, category, skins=(), twitter=True, name=None):
    e = {"name": name or unified, "unified": unified, "image": f"{unified.lower()}.png", "category": category,
         "short_names": [unified.lower()], "has_img_google": True, "has_img_twitter": twitter}
    if skins:
        e["skin_variations"] = {t: {"unified": f"{unified}-{t}", "image": f"{unified.lower()}-{t.lower()}.png",
                                    "has_img_google": True, "has_img_twitter": True} for t in skins}
    return e


ENTRIES = [
    entry(TRAIN, "Smileys & Emotion"),
    entry(HELD, "People & Body", skins=["1F3FB"]),
    entry("1F3FB", "Component"),
    entry("1F1FA-1F1F8", "Flags", twitter=False),  # no twitter image: skipped for that style only
]


def make_package(root: Path, style: str, entries=ENTRIES) -> Path:
    """root/package/{emoji.json, img/<style>/64/*.png}: 4x4 RGBA, pixel (0,0) transparent,
    (1,0) half-transparent blue, the rest opaque red."""
    img_dir = root / "package" / "img" / style / "64"
    img_dir.mkdir(parents=True)
    (root / "package" / "emoji.json").write_text(json.dumps(entries))
    for e in entries:
        for v in [e, *e.get("skin_variations", {}).values()]:
            if v[f"has_img_{style}"]:
                im = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
                im.putpixel((0, 0), (0, 0, 0, 0))
                im.putpixel((1, 0), (0, 0, 255, 128))
                im.save(img_dir / v["image"])
    return root


def files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*.png")}


def fake_npm(tmp_path, monkeypatch, script: str):
    """Put an `npm` shell script first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def write_tgz(path: Path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def serve_tarballs(tmp_path, monkeypatch, packages: dict[str, Path]):
    """A fake `npm pack NAME@VER` that copies NAME.tgz (made from `packages`) to NAME-VER.tgz."""
    tarballs = tmp_path / "tarballs"
    tarballs.mkdir()
    for name, d in packages.items():  # npm names a scoped package's tarball "scope-name-VER.tgz"
        with tarfile.open(tarballs / f"{name.removeprefix('@').replace('/', '-')}.tgz", "w:gz") as tar:
            tar.add(d / "package", arcname="package")
    fake_npm(tmp_path, monkeypatch, f"""name=$(echo "${{2%@*}}" | sed 's|^@||; s|/|-|'); ver="${{2##*@}}"
cp "{tarballs}/$name.tgz" "./$name-$ver.tgz" && echo "$name-$ver.tgz"
""")

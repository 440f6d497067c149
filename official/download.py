"""Generic pieces of fetching a release: an HTTP download that resumes (HTTP Range) with a progress bar,
a size check and a free-space check, and the safe extraction of named files from an untrusted tarball.

Every failure is one ValueError line saying which URL or file failed and what to do about it.
"""
from __future__ import annotations

import hashlib
import http.client
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

TIMEOUT = 60.0  # seconds without a byte before a request gives up (a resume then picks it up)
CHUNK = 1 << 20
UNPACK_FACTOR = 2.0  # free space asked for beyond the download itself: unpacked files + converted files
USER_AGENT = "rq-transformer-fetch/1"


class BadArchive(ValueError):
    """The downloaded archive itself is wrong (corrupt, unsafe, not the expected layout): delete it."""


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_space(folder: Path, need: float, what: str) -> None:
    """One line when `folder`'s disk has less than `need` bytes free (checked before any byte is fetched)."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ValueError(f"{what} needs about {gb(need)} free in {folder} (the download plus {UNPACK_FACTOR:g}x its "
                         f"size to unpack and convert), only {gb(free)} is free: free some space or pass "
                         "--cache_dir on another disk")


def _request(url: str, method: str = "GET", start: int = 0) -> urllib.request.Request:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}  # sizes must be the file's own bytes
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.Request(url, method=method, headers=headers)


def network_error(url: str, e: Exception, hint: str) -> ValueError:
    if isinstance(e, urllib.error.HTTPError):
        why = f"HTTP {e.code} {e.reason}"
    else:
        reason = getattr(e, "reason", e)
        why = f"unreachable or offline: {reason}" if str(reason) else f"unreachable ({type(e).__name__})"
    return ValueError(f"could not download {url} ({why}){hint}")


def remote_size(url: str, hint: str = "", timeout: float = TIMEOUT) -> int | None:
    """The file's size from a HEAD request; None when the server does not say (or refuses HEAD)."""
    try:
        with urllib.request.urlopen(_request(url, "HEAD"), timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        if e.code in (403, 405, 501):  # some hosts refuse HEAD only: the GET's headers say the size
            return None
        raise network_error(url, e, hint) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise network_error(url, e, hint) from None
    return int(length) if length and length.isdigit() else None


def _open(url: str, have: int, hint: str, timeout: float):
    """GET from byte `have` -> (response, the byte it starts at, the file's total size or None). A server that
    ignores Range starts at 0; one that answers 416 (the partial is not a prefix it can extend) too."""
    for start in ((have, 0) if have else (0,)):
        try:
            resp = urllib.request.urlopen(_request(url, start=start), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and start:
                continue  # try again from the first byte
            raise network_error(url, e, hint) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise network_error(url, e, hint) from None
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if resp.status != 206:
            return resp, 0, length
        span = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
        if span is None or int(span[1]) != start:
            resp.close()
            raise ValueError(f"{url}: the server resumed at another byte than asked ({span and span[1]}, not "
                             f"{start}): delete the partial download or pass --force")
        total = int(span[3]) if span[3] != "*" else (start + length if length is not None else None)
        return resp, start, total
    raise AssertionError("unreachable")  # the loop's last start is 0, which never continues


def _receive(resp, part: Path, start: int, total: int | None, desc: str, progress: bool) -> None:
    """Append the body to `part` (from byte `start`); a broken connection just stops early (checked after)."""
    from tqdm.auto import tqdm

    with resp, open(part, "r+b" if part.exists() else "wb") as f, \
            tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                 disable=not progress) as bar:
        f.seek(start)
        f.truncate()
        try:
            for chunk in iter(lambda: resp.read(CHUNK), b""):
                f.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException):  # reset, timeout, IncompleteRead: resumable
            pass


def download(url: str, dest: Path, *, progress: bool = True, hint: str = "", timeout: float = TIMEOUT) -> Path:
    """Fetch `url` into `dest` via `dest.part`, resuming a partial one; `dest` appears only once its size equals
    the announced one. Free space for the rest plus UNPACK_FACTOR x the size is checked before the body is read."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    size = remote_size(url, hint, timeout)
    if size is not None:
        check_space(dest.parent, max(size - have, 0) + UNPACK_FACTOR * size, f"fetching {url}")
        if have > size:  # not a prefix of this file: start over
            part.unlink()
            have = 0
    if size is not None and have == size:  # finished before, not renamed (interrupted at the very end)
        part.rename(dest)
        return dest
    resp, start, total = _open(url, have, hint, timeout)
    if size is None and total is not None:
        try:
            check_space(dest.parent, total - start + UNPACK_FACTOR * total, f"fetching {url}")
        except ValueError:
            resp.close()
            raise
    _receive(resp, part, start, total, dest.name, progress)
    got = part.stat().st_size
    if total is not None and got < total:
        raise ValueError(f"download of {url} stopped at {got:,} of {total:,} bytes: run the same command again to "
                         f"resume (the partial file {part} is kept)")
    if total is not None and got > total:
        part.unlink()
        raise ValueError(f"download of {url} gave {got:,} bytes, more than the {total:,} announced: removed, "
                         "run again")
    part.rename(dest)
    return dest


# ---- safe extraction ------------------------------------------------------------------------------------

def _checked_name(member: tarfile.TarInfo, tarball: Path) -> str:
    """The member's relative name, or one line refusing the whole tarball (absolute, '..', links, devices)."""
    name = member.name.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise BadArchive(f"{tarball.name}: member {member.name!r} points outside the folder it unpacks into: "
                         "refused, nothing kept")
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "a device or fifo" if member.isdev() else "special"
        raise BadArchive(f"{tarball.name}: member {member.name!r} is {kind}, which a release never holds: refused, "
                         "nothing extracted")
    return "/".join(p for p in parts if p != ".")


def _wanted(name: str, wanted: tuple[str, ...]) -> str | None:
    """Which wanted relative path `name` is (it may be nested under any folders), or None."""
    for w in wanted:
        if name == w or name.endswith("/" + w):
            return w
    return None


def _copy(src, target: Path) -> None:
    """src -> target; a failed write (disk full) is one plain line, a failed read stays the archive's error."""
    with src, open(target, "wb") as dst:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            try:
                dst.write(chunk)
            except OSError as e:
                raise ValueError(f"could not write {target} ({e.strerror or e}): free some space") from None


def extract(tarball: Path, wanted: tuple[str, ...], out: Path, required: tuple[str, ...] | None = None) -> list[str]:
    """Stream the members of `tarball` whose paths end in one of `wanted` into `out/<wanted path>`, in one pass
    and by our own writes (no extractall); every member is checked first. -> the wanted paths found. One line
    when the archive is corrupt, unsafe, lacks one of `required` (default: all wanted) or holds one twice."""
    found: dict[str, str] = {}
    try:
        with tarfile.open(tarball, mode="r|*") as tar:
            for member in tar:
                name = _checked_name(member, tarball)
                key = _wanted(name, wanted) if member.isfile() else None
                if key is None:
                    continue
                if key in found:
                    raise BadArchive(f"{tarball.name} holds {key} twice ({found[key]} and {name}): which one is "
                                     "meant is unclear, refused")
                found[key] = name
                target = out / key
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy(tar.extractfile(member), target)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadArchive(f"{tarball.name} is not a readable tar.gz ({first}): corrupt download") from None
    missing = [w for w in (wanted if required is None else required) if w not in found]
    if missing:
        raise BadArchive(f"{tarball.name} has no {', '.join(missing)}: not a release in the expected layout")
    return sorted(found)

"""`python -m official.fetch_official NAME`: download (resumed, size- and space-checked), safe unpacking, conversion
and caching, against a real HTTP server on 127.0.0.1 serving tiny tarballs in the official layout built from
tests/fixtures/official. Nothing here touches the network or the user's cache."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from official import fetch_official as fo

FIXTURES = Path(__file__).parent / "fixtures" / "official"
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


class State:
    """What the server serves (path -> bytes), how it misbehaves, and every request it saw."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut_once = False  # the next GET sends half its body, then closes
        self.ignore_range = False
        self.extra_length = 0  # Content-Length claims this many bytes more than are sent
        self.huge_head = False  # HEAD advertises a size no disk has
        self.no_head = False  # HEAD answers 405: the size comes from the GET


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _data(self) -> bytes | None:
        st: State = self.server.state
        st.log.append((self.command, urlsplit(self.path).path, self.headers.get("Range")))
        data = st.files.get(urlsplit(self.path).path)
        if data is None:
            self.send_error(404)
        return data

    def do_HEAD(self):
        st, data = self.server.state, self._data()
        if data is None:
            return
        if st.no_head:
            return self.send_error(405)
        self.send_response(200)
        self.send_header("Content-Length", str(10**18 if st.huge_head else len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        st, data = self.server.state, self._data()
        if data is None:
            return
        rng = self.headers.get("Range")
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng and not st.ignore_range else 0
        if start >= len(data) and rng and not st.ignore_range:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body) + st.extra_length))
        self.end_headers()
        if st.cut_once:
            st.cut_once, body = False, body[: len(body) // 2]
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = State()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RQ_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.delenv("RQ_OFFICIAL_BASE_URL", raising=False)


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, **info) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data or b"")
    for k, v in info.items():
        setattr(member, k, v)
    tar.addfile(member, io.BytesIO(data) if data is not None else None)


def release_tarball(stage2: str = "uncond", top: str = "ffhq", replace: dict | None = None, extra=()) -> bytes:
    """A tar.gz laid out as a release: top/stage1/, top/stage2/ (model.pt + config.yaml), plus `extra` members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _add(tar, top, type=tarfile.DIRTYPE, mode=0o755)
        for stage, src in (("stage1", FIXTURES / "stage1"), ("stage2", FIXTURES / stage2)):
            for file in ("model.pt", "config.yaml"):
                name = f"{top}/{stage}/{file}"
                _add(tar, name, (replace or {}).get(name, (src / file).read_bytes()))
        _add(tar, f"{top}/NOTES.txt", b"not taken")
        for name, data, info in extra:
            _add(tar, name, data, **info)
    return buf.getvalue()


def serve(httpd, name: str, data: bytes) -> str:
    path = "/" + fo.RELEASES[name].path
    httpd.state.files[path] = data
    return path


def one_line(excinfo) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def nothing_cached(cache: Path, name: str = "ffhq") -> bool:
    return not (cache / name).exists() and not list(cache.glob(f".{name}.*"))


def check_parity(folder: Path) -> None:
    from pipelines import EXACT_CPU, RQPipeline

    pipe = RQPipeline.from_pretrained(folder, device="cpu", **EXACT_CPU)
    ref1, ref2 = load_file(str(FIXTURES / "stage1" / "expected.safetensors")), \
        load_file(str(FIXTURES / "uncond" / "expected.safetensors"))
    with torch.inference_mode():
        assert torch.equal(pipe.rqvae.encode(ref1["images"]), ref1["codes"].long())
        assert (pipe.transformer(ref2["codes"].long()) - ref2["logits"]).abs().max() < TOL


# ---- the happy path ---------------------------------------------------------------------------------------

def test_fetch_converts_prints_the_folder_and_reuses_the_cache_offline(server, tmp_path, capsys):
    data = release_tarball()
    serve(server, "ffhq", data)
    cache = tmp_path / "cache"
    fo.main(["ffhq", "--cache_dir", str(cache), "--base_url", server.url])
    folder = cache / "ffhq"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(folder)
    check_parity(folder)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "## Downloaded files" in card and hashlib.sha256(data).hexdigest() in card
    assert server.url + "/" + fo.RELEASES["ffhq"].path in card
    assert not list((cache / "downloads").iterdir())  # the tarball is deleted once converted
    assert not list(cache.glob(".ffhq.*"))
    server.shutdown()
    server.server_close()
    seen = len(server.state.log)
    assert fo.fetch_official("ffhq", cache_dir=cache, base_url=server.url) == folder  # offline: from the cache
    assert len(server.state.log) == seen


def test_a_cut_download_resumes_with_range(server, tmp_path):
    data = release_tarball()
    path = serve(server, "ffhq", data)
    cache, server.state.cut_once = tmp_path / "cache", True
    with pytest.raises(ValueError, match="stopped at .* run the same command again") as e:
        fo.fetch_official("ffhq", cache_dir=cache, base_url=server.url, progress=False)
    one_line(e)
    part = cache / "downloads" / "ffhq.tar.gz.part"
    assert part.stat().st_size == len(data) // 2 and nothing_cached(cache)
    folder = fo.fetch_official("ffhq", cache_dir=cache, base_url=server.url, progress=False, keep_download=True)
    gets = [r for r in server.state.log if r[0] == "GET" and r[1] == path]
    assert gets[-1][2] == f"bytes={len(data) // 2}-"
    assert (cache / "downloads" / "ffhq.tar.gz").read_bytes() == data
    assert hashlib.sha256(data).hexdigest() in (folder / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("case", ["ignores_range", "answers_416"])
def test_a_resume_the_server_cannot_serve_starts_over(server, tmp_path, case):
    data = release_tarball()
    serve(server, "ffhq", data)
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    part = cache / "downloads" / "ffhq.tar.gz.part"
    if case == "ignores_range":
        part.write_bytes(data[:100])
        server.state.ignore_range = True
    else:  # no size from HEAD, and a partial longer than the file: the server says 416
        part.write_bytes(data + b"junk")
        server.state.no_head = True
    folder = fo.fetch_official("ffhq", cache_dir=cache, base_url=server.url, progress=False, keep_download=True)
    assert (cache / "downloads" / "ffhq.tar.gz").read_bytes() == data and (folder / "pipeline.json").is_file()


# ---- what is refused ----------------------------------------------------------------------------------------

def test_a_short_download_is_kept_for_resume_and_nothing_converted(server, tmp_path):
    serve(server, "ffhq", release_tarball())
    server.state.extra_length, cache = 100, tmp_path / "cache"
    with pytest.raises(ValueError, match="stopped at") as e:
        fo.fetch_official("ffhq", cache_dir=cache, base_url=server.url, progress=False)
    one_line(e)
    assert nothing_cached(cache) and (cache / "downloads" / "ffhq.tar.gz.part").is_file()
    assert not (cache / "downloads" / "ffhq.tar.gz").exists()


@pytest.mark.parametrize("corrupt", ["garbage", "truncated_gzip"])
def test_a_corrupt_download_is_removed(server, tmp_path, corrupt):
    data = release_tarball()
    serve(server, "ffhq", b"\x1f\x8b not a tarball at all" * 50 if corrupt == "garbage" else data[: len(data) // 2])
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="not a readable tar.gz.*removed") as e:
        fo.fetch_official("ffhq", cache_dir=cache, base_url=server.url, progress=False)
    one_line(e)
    assert nothing_cached(cache) and not list((cache / "downloads").iterdir())


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "fifo", "twice"])
def test_an_unsafe_tarball_is_refused_and_nothing_lands_outside(server, tmp_path, kind):
    outside = tmp_path / "outside"
    extra = {
        "dotdot": [("ffhq/../../outside", b"evil", {})],
        "absolute": [(str(outside), b"evil", {})],
        "symlink": [("ffhq/link", None, {"type": tarfile.SYMTYPE, "linkname": str(outside)})],
        "hardlink": [("ffhq/link", None, {"type": tarfile.LNKTYPE, "linkname": "ffhq/stage1/model.pt"})],
        "fifo": [("ffhq/pipe", None, {"type": tarfile.FIFOTYPE})],
        "twice": [("ffhq/copy/stage1/model.pt", b"another", {})],
    }[kind]
    serve(server, "ffhq", release_tarball(extra=extra))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="refused") as e:
        fo.fetch_official("ffhq", cache_dir=cache, base_url=server.url, progress=False)
    one_line(e)
    assert not outside.exists() and not (tmp_path.parent / "outside").exists()
    assert nothing_cached(cache) and not list((cache / "downloads").iterdir())


class Planted:
    """Unpickling this would run code that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_planted_pickle_is_refused_and_runs_nothing(server, tmp_path):
    marker = tmp_path / "pwned"
    planted = pickle.dumps({"state_dict": {}, "x": Planted(marker)}, protocol=2)
    serve(server, "ffhq", release_tarball(replace={"ffhq/stage1/model.pt": planted}))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="weights-only load refuses") as e:
        fo.fetch_official("ffhq", cache_dir=cache, base_url=server.url, progress=False)
    one_line(e)
    assert not marker.exists() and nothing_cached(cache) and not list((cache / "downloads").iterdir())


def test_no_space_is_one_line_before_any_download(server, tmp_path):
    serve(server, "ffhq", release_tarball())
    server.state.huge_head, cache = True, tmp_path / "cache"
    with pytest.raises(ValueError, match="free") as e:
        fo.fetch_official("ffhq", cache_dir=cache, base_url=server.url, progress=False)
    assert "--cache_dir" in one_line(e)
    assert [r[0] for r in server.state.log] == ["HEAD"] and not list((cache / "downloads").iterdir())


def test_an_unreachable_host_names_the_url_and_the_mirror_flag(tmp_path):
    with pytest.raises(ValueError, match="could not download http://127.0.0.1:9/models/.*--base_url") as e:
        fo.fetch_official("ffhq", cache_dir=tmp_path / "cache", base_url="http://127.0.0.1:9", progress=False)
    one_line(e)


# ---- text models, FID statistics, the CLI and the app ---------------------------------------------------------

def test_a_text_release_fetches_the_bpe_files(server, tmp_path):
    data = release_tarball("text", top="cc3m")
    serve(server, "cc3m", data)
    for file in ("bpe-16k-vocab.json", "bpe-16k-merges.txt"):
        server.state.files[f"/{fo.BPE_PATH}{file}"] = (FIXTURES / "text" / "tokenizer" / file).read_bytes()
    folder = fo.fetch_official("cc3m", cache_dir=tmp_path / "cache", base_url=server.url, progress=False)
    assert (folder / "rqtransformer" / "tokenizer.json").is_file()
    card = (folder / "README.md").read_text(encoding="utf-8")
    vocab = (FIXTURES / "text" / "tokenizer" / "bpe-16k-vocab.json").read_bytes()
    assert hashlib.sha256(vocab).hexdigest() in card and f"/{fo.BPE_PATH}bpe-16k-merges.txt" in card
    from pipelines import RQPipeline

    tf = RQPipeline.from_pretrained(folder, device="cpu").transformer
    meta = json.loads((FIXTURES / "text" / "prompts.json").read_text(encoding="utf-8"))
    assert tf.tokenizer.encode(meta["prompts"], tf.config.max_text_len)[0].tolist() == meta["ids"]


def fid_tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for key in fo.FID_STATS_KEYS:
            npz = io.BytesIO()
            np.savez(npz, mu=np.full(4, len(key), np.float64), sigma=np.eye(4))
            _add(tar, f"fid_stats/{key}.npz", npz.getvalue())
        _add(tar, "fid_stats/run_me.py", b"import os")
    return buf.getvalue()


def test_fid_stats_are_fetched_once_and_found_by_release_or_key(server, tmp_path):
    server.state.files["/" + fo.FID_STATS_PATH] = fid_tarball()
    cache = tmp_path / "cache"
    file = fo.fid_stats_file("ffhq", cache_dir=cache, base_url=server.url, progress=False)
    assert file == cache / "fid_stats" / "ffhq_256_train.npz"
    assert np.load(file)["mu"][0] == len("ffhq_256_train")
    assert sorted(p.stem for p in file.parent.iterdir()) == sorted(fo.FID_STATS_KEYS)  # the .py was not taken
    seen = len(server.state.log)
    assert fo.fid_stats_file("lsun_256_cat", cache_dir=cache, base_url=server.url).is_file()
    assert len(server.state.log) == seen
    assert fo.stats_name("imagenet-3.8b-rqvae-50e") == "imagenet_256_train" == fo.stats_name("imagenet_256_train")
    assert set(fo.FID_STATS_OF_RELEASE) == set(fo.RELEASES)
    with pytest.raises(ValueError, match="no FID statistics"):
        fo.stats_name("mnist")


def test_urls_cache_folder_and_names(monkeypatch, tmp_path):
    assert fo.release_url(fo.RELEASE_HOST, fo.RELEASES["ffhq"].path) == \
        "https://twg.kakaocdn.net/brainrepo/models/RQVAE/d47570aeff6ba300735606a806f54663/ffhq.tar.gz"
    assert fo.release_url(fo.GITHUB_RAW, fo.BPE_PATH + "x", "http://m/") == \
        "http://m/rqvae/txtimg_datasets/tokenizers/pretrained/x"
    assert fo.default_cache_dir() == tmp_path / "default-cache"
    monkeypatch.delenv("RQ_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fo.default_cache_dir() == tmp_path / "xdg" / "rq-transformer" / "official"
    with pytest.raises(ValueError, match="unknown release 'ffhq2'.*imagenet-1.4b-rqvae-50e"):
        fo.fetch_official("ffhq2")


def test_the_cli_says_one_line_for_a_bad_name(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "official.fetch_official", "celeba", "--cache_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "cc3m-cc12m-yfcc" in proc.stderr, proc.stderr


def test_the_app_resolves_official_weights(server, tmp_path, monkeypatch):
    from app_io import resolve_weights

    serve(server, "church", release_tarball(top="church"))
    monkeypatch.setenv("RQ_OFFICIAL_BASE_URL", server.url)
    folder = resolve_weights("official:church")
    assert Path(folder) == tmp_path / "default-cache" / "church" and (Path(folder) / "pipeline.json").is_file()
    assert resolve_weights("weights/emoji-64") == "weights/emoji-64"
    with pytest.raises(ValueError, match="unknown release"):
        resolve_weights("official:nope")

"""Hub repo ids in from_pretrained (without network: a Hub cache laid out on disk as the client lays it out),
and the folder push_to_hub would upload."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from PIL import Image
from conftest import gen, tiny_pipeline

from pipelines import RQPipeline
from pipelines.hub import hub_folder
from rqcore.hub_transfer import is_repo_id, resolve_folder
from rqtransformer import RQTransformer
from rqvae import RQVAE

REPO = "someone/tiny-rq"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Put `folder` into `cache` as snapshot_download leaves a model repo: models--<user>--<name>/ with
    blobs/<git sha1, or sha256 for LFS files>, snapshots/<commit>/<file> relative symlinks to the blobs and
    refs/main holding the commit hash (no newline)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        if file.suffix in (".safetensors", ".png"):  # stored with LFS on the Hub: named by sha256
            blob = hashlib.sha256(data).hexdigest()
        else:  # a regular git file: named by its git blob hash
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blob).write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(the saved pipeline, its folder, a Hub cache holding it as REPO)."""
    root = tmp_path_factory.mktemp("hub")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "saved")
    (root / "saved" / "README.md").write_text("# tiny\n")
    lay_out_hub_cache(root / "cache", REPO, root / "saved")
    return pipe, root / "saved", root / "cache"


def test_the_cache_is_laid_out_as_the_client_reads_it(hub):
    _, saved, cache = hub
    info = huggingface_hub.scan_cache_dir(cache)  # the client's own reading of a cache folder
    assert not info.warnings
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == (REPO, "model")
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == {"main"}
    assert {f.file_name for f in revision.files} == {p.name for p in saved.rglob("*") if p.is_file()}


def test_pipeline_from_a_repo_id_samples_like_the_original(hub):
    pipe, _, cache = hub
    loaded = RQPipeline.from_pretrained(REPO, local_files_only=True, cache_dir=cache)
    assert loaded.folder == cache / "models--someone--tiny-rq" / "snapshots" / COMMIT
    assert torch.equal(loaded("circles", num_images=2, generator=gen(3)).codes,
                       pipe("circles", num_images=2, generator=gen(3)).codes)
    by_commit = RQPipeline.from_pretrained(REPO, revision=COMMIT, local_files_only=True, cache_dir=cache)
    assert by_commit.folder == loaded.folder


def test_offline_mode_loads_from_the_cache_and_names_the_fix(hub, monkeypatch):
    _, _, cache = hub
    # what HF_HUB_OFFLINE=1 sets when the client is imported: every request is refused before it is sent
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert RQPipeline.from_pretrained(REPO, cache_dir=cache).class_names == ["circles", "squares", "stars"]
    with pytest.raises(ValueError) as e:
        RQPipeline.from_pretrained("someone/not-there", cache_dir=cache)
    assert "'someone/not-there'" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    assert "\n" not in str(e.value)


def test_both_models_load_from_a_repo_id_subfolder(hub):
    pipe, _, cache = hub
    kw = dict(local_files_only=True, cache_dir=cache)
    vae = RQVAE.from_pretrained(REPO, subfolder="rqvae", **kw)
    tf = RQTransformer.from_pretrained(REPO, subfolder="rqtransformer", **kw)
    for ours, theirs in ((vae, pipe.rqvae), (tf, pipe.transformer)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


@pytest.mark.parametrize("repo, revision, words", [
    ("someone/missing", None, ["'someone/missing'", "local_files_only", "download it", "local folder"]),
    (REPO, "v9", ["revision 'v9'", "not in the Hub cache"]),
])
def test_missing_repo_or_revision_is_one_clear_line(hub, repo, revision, words):
    with pytest.raises(ValueError) as e:
        RQPipeline.from_pretrained(repo, revision=revision, local_files_only=True, cache_dir=hub[2])
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


def test_a_local_folder_wins_and_other_strings_do_not_exist(hub, tmp_path, monkeypatch):
    pipe, saved, cache = hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone").mkdir()
    (tmp_path / "someone" / "tiny-rq").symlink_to(saved)  # the same name as the cached repo, as a folder
    assert RQPipeline.from_pretrained(REPO, local_files_only=True, cache_dir=cache).folder == Path(REPO)
    for name in ("no-such-folder", "a/b/c", "bad--name/x", "../up/x"):
        assert resolve_folder(name) == Path(name) and not is_repo_id(name)
        with pytest.raises(ValueError, match="does not exist"):
            RQPipeline.from_pretrained(name, local_files_only=True, cache_dir=cache)
    with pytest.raises(ValueError, match="revision must be"):
        resolve_folder("someone/other", revision="../../x", local_files_only=True, cache_dir=cache)


def test_hub_folder_holds_the_pipeline_a_card_and_no_pickles(hub, tmp_path):
    pipe, saved, _ = hub
    folder = hub_folder(pipe, tmp_path / "up", repo_id="me/tiny")  # a pipeline built in memory: a card is written
    card = (folder / "README.md").read_text()
    assert card.startswith("---\ntags:") and "# tiny" in card and 'from_pretrained("me/tiny")' in card
    assert "32 px" in card and "4×4×2" in card and "3 classes" in card
    assert {p.suffix for p in folder.rglob("*") if p.is_file()} == {".json", ".safetensors", ".md"}
    again = RQPipeline.from_pretrained(folder)
    assert torch.equal(again(num_images=1, generator=gen(0)).codes, pipe(num_images=1, generator=gen(0)).codes)
    loaded = RQPipeline.from_pretrained(saved)  # loaded from a folder with a card: that card travels
    (saved / "examples").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(saved / "examples" / "red.png")
    folder = hub_folder(loaded, tmp_path / "up2")
    assert (folder / "README.md").read_text() == "# tiny\n" and (folder / "examples" / "red.png").is_file()


@pytest.mark.parametrize("part", ["rqvae", "transformer"])
def test_a_single_model_round_trips_through_its_hub_folder(hub, tmp_path, part):
    pipe, _, _ = hub
    model = getattr(pipe, part)
    folder = model.hub_folder(tmp_path / "up", repo_id="me/part", dtype=torch.float16)
    card = (folder / "README.md").read_text()
    kind = type(model).__name__
    assert card.startswith("---\ntags:") and f'{kind}.from_pretrained("me/part")' in card and "| codebook_size |" in card
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    lay_out_hub_cache(tmp_path / "cache", "me/part", folder)  # as a Hub download would leave it
    again = type(model).from_pretrained("me/part", local_files_only=True, cache_dir=tmp_path / "cache")
    for name, t in model.state_dict().items():
        expected = t.half().float() if t.is_floating_point() else t
        assert torch.equal(again.state_dict()[name].float() if t.is_floating_point() else again.state_dict()[name],
                           expected), name


def test_push_to_hub_refuses_a_bad_repo_id_before_any_network(hub):
    pipe, _, _ = hub
    with pytest.raises(ValueError, match="repo_id must be 'user/name'"):
        pipe.rqvae.push_to_hub("no-slash")


def test_app_takes_a_repo_id(hub, monkeypatch, capsys):
    import app

    _, _, cache = hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE=... sets
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(app, "CACHE_ROOT", cache.parent / "gradio")
    assert app.build_demo(REPO) is not None  # built from the cached snapshot, not served
    with pytest.raises(SystemExit) as info:
        app.main(["--weights", "someone/missing"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0 and "'someone/missing'" in err and "HF_HUB_OFFLINE" in err

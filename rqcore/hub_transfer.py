"""Hub repo ids as well as local folders for `from_pretrained`, and the upload behind `push_to_hub`.

A path that exists is always used as is. A string shaped like "user/name" that is not an existing path is
fetched with `huggingface_hub.snapshot_download` into the Hub cache (or found there offline). Only JSON,
safetensors, the model card and example images are fetched: nothing that could be unpickled.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .cards import CARD_NAME

# What a saved model or pipeline folder holds (rqvae/, rqtransformer/, pipeline.json, prompts.json,
# tokenizer.json, README.md, examples/*.png); fnmatch's "*" also matches "/", so "*.json" covers subfolders.
ALLOW_PATTERNS = ["*.json", "*.safetensors", CARD_NAME, "examples/*.png"]


def is_repo_id(path) -> bool:
    """Whether `path` reads as a Hub model id "namespace/name" (a bare "name" is taken as a local path:
    a mistyped folder should say "does not exist", not go looking on the Hub)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fspath(path)
    if not isinstance(text, str) or text.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_folder(path, *, revision: str | None = None, local_files_only: bool = False,
                   cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                   subfolder: str = "") -> Path:
    """A local folder for `path`: the path itself if it exists (or is not a repo id: the caller then says
    it does not exist), else the snapshot of Hub repo `path` at `revision` (default: main), downloaded
    into `cache_dir` (default: the Hub cache, HF_HUB_CACHE) unless `local_files_only`. `subfolder`: a
    folder inside it (e.g. "rqvae" of a pipeline). Hub failures raise one ValueError line saying what to do."""
    if subfolder and (Path(subfolder).is_absolute() or ".." in Path(subfolder).parts):
        raise ValueError(f"subfolder must be a relative folder inside the model, got {subfolder!r}")
    if not isinstance(path, (str, os.PathLike)):
        return path  # the caller's Path() says what is wrong
    local = Path(path)
    if local.exists() or not is_repo_id(path):
        return local / subfolder
    repo_id = os.fspath(path)
    if revision is not None and (not isinstance(revision, str) or not revision or ".." in revision.split("/")
                                 or revision.startswith("/") or "\\" in revision):
        raise ValueError(f"revision must be a branch, tag or commit hash of {repo_id!r}, got {revision!r}")
    import huggingface_hub

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + p for p in ALLOW_PATTERNS[:2]] + ([] if prefix else ALLOW_PATTERNS[2:])
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=local_files_only,
                                                   cache_dir=cache_dir, token=token, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 - filtered below: only the Hub client's and the network's errors
        if not _is_hub_error(e):
            raise
        raise ValueError(hub_error_message(repo_id, revision, local_files_only, e)) from None
    return Path(folder) / subfolder


def _is_hub_error(e: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    # OSError covers the cache misses (LocalEntryNotFoundError) and requests' errors (older clients);
    # the HTTP client's own errors are recognised by their module, whichever client this version uses
    return isinstance(e, (HfHubHTTPError, HFValidationError, OSError, ConnectionError)) \
        or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")


def hub_error_message(repo_id: str, revision: str | None, local_files_only: bool, e: Exception) -> str:
    """One line: which repo (and revision) failed, why, and how to fix it."""
    from huggingface_hub import constants, errors
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    lead = f"{repo_id} is not a local folder, and Hub repo {repo_id!r}"
    what = lead + (f" at revision {revision!r}" if revision else "")
    if isinstance(e, RevisionNotFoundError):
        return f"{lead} has no revision {revision!r}: pass an existing branch, tag or commit hash as revision="
    if isinstance(e, GatedRepoError):
        return f"{lead} is gated: accept its terms on the Hub, then log in (hf auth login) or pass token="
    if isinstance(e, RepositoryNotFoundError):
        return f"{lead} was not found: check the name; for a private repo log in (hf auth login) or pass token="
    if isinstance(e, LocalEntryNotFoundError):
        if isinstance(e, getattr(errors, "IncompleteSnapshotError", ())):  # newer clients check the cache
            return f"{what} is only partly in the Hub cache: download it again with network access"
        if local_files_only:
            return (f"{what} is not in the Hub cache (local_files_only=True): download it once with network "
                    "access (without local_files_only), or pass a local folder")
        if constants.HF_HUB_OFFLINE:
            return (f"{what} is not in the Hub cache and HF_HUB_OFFLINE=1 forbids downloading it: unset "
                    "HF_HUB_OFFLINE and download it with network access, or pass a local folder")
        cause = e.__cause__ or e.__context__
        why = f" ({type(cause).__name__})" if cause is not None else ""
        return (f"{what} is not in the Hub cache and the Hub could not be reached{why}: check the network "
                "(or proxy) and try again, or pass a local folder")
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{what} could not be loaded ({type(e).__name__}: {first[:200]}): check the network, or pass a local folder"


def push_written(write, repo_id: str, *, token: str | None = None, private: bool = False,
                 commit_message: str = "Upload RQPipeline"):
    """push_to_hub of a model or a pipeline: `write(folder)` fills a fresh temporary folder, which is then
    uploaded by upload_folder."""
    with tempfile.TemporaryDirectory(prefix="rq-upload-") as tmp:
        write(tmp)
        return upload_folder(tmp, repo_id, token=token, private=private, commit_message=commit_message)


def upload_folder(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
                  commit_message: str = "Upload RQPipeline"):
    """Create model repo `repo_id` if needed (exist_ok) and upload `folder` as one commit; returns the
    client's CommitInfo (its .commit_url says where it went)."""
    if not is_repo_id(repo_id):
        raise ValueError(f"repo_id must be 'user/name' or 'org/name', got {repo_id!r}")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), commit_message=commit_message,
                                 allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # noqa: BLE001 - the Hub client's and the network's errors only
        if not _is_hub_error(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"could not push to Hub repo {repo_id!r}: {type(e).__name__}: {first}; log in with a "
                         "write token (hf auth login) or pass token=, and check the network") from None

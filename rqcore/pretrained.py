"""Save/load a model as `config.json` + `model.safetensors` (shared by both stages).

Loading is strict and never unpickles: a missing, unexpected or wrong-shape tensor, or a config
field of the wrong type, raises `ValueError` naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import types
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .cards import CARD_NAME, PAPER, model_card
from .checks import is_number, is_whole
from .hub_transfer import push_written, resolve_folder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors: dict, file: str | os.PathLike, metadata: dict | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """A safetensors file, atomically (temp file, then rename), with the permissions of any new file.

    Streamed: each tensor is written (cast to `dtype` if floating and given) straight from its memory, one at a
    time, so writing a model never holds a second copy of its weights (safetensors' save_file builds the whole
    file in memory first: 2x a 355 M-parameter model's 1.4 GB). safetensors itself creates files 0600; a model
    saved for an app or a Space run by another user must be readable like config.json beside it."""
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    out_dtype = {k: dtype if dtype is not None and t.is_floating_point() else t.dtype for k, t in tensors.items()}
    header, offset = {"__metadata__": metadata} if metadata else {}, 0
    for key, t in tensors.items():
        if out_dtype[key] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor '{key}' has dtype {out_dtype[key]}, which safetensors cannot store")
        size = t.numel() * out_dtype[key].itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[out_dtype[key]], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for key, t in tensors.items():
            t = t.detach().to(device="cpu", dtype=out_dtype[key]).contiguous().reshape(-1)
            f.write(memoryview(t.view(torch.uint8).numpy()))
    probe = file.with_name(file.name + ".mode")
    try:
        probe.touch()  # created with 0666 & ~umask, the mode every ordinary file here gets
        os.chmod(tmp, probe.stat().st_mode & 0o777)
    except OSError:
        pass  # a file system without POSIX modes: keep what safetensors made
    finally:
        probe.unlink(missing_ok=True)
    os.replace(tmp, file)


def config_from_dict(config_class, data: dict, source: str = "config"):
    """Build a flat config dataclass from JSON data, checking names and types."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(config_class)
    values = {}
    for name, value in data.items():
        values[name] = _coerce(value, hints[name], f"{source}: field '{name}'")
    try:
        return config_class(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _coerce(value, hint, where):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(a for a in options if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        inner = args[0] if args else int
        return tuple(_coerce(v, inner, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if not is_whole(value):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if not is_number(value):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        inner = (typing.get_args(hint) or (str,))[0]
        return [_coerce(v, inner, where) for v in value]
    return value


def load_config(config_class, path: str | os.PathLike):
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no {CONFIG_NAME} found in {path}: expected a folder written by save_pretrained")
    return config_from_dict(config_class, read_json(file, str(file)), source=str(file))


def read_json(file: Path, what: str):
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def _aliases(state: dict) -> dict[str, str]:
    """Map keys that share storage with an earlier key (e.g. a shared codebook) to that key."""
    seen, alias = {}, {}
    for key, t in state.items():
        if t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            alias[key] = seen[ident]
        else:
            seen[ident] = key
    return alias


def _shared_names(model: torch.nn.Module) -> dict[str, str]:
    """_aliases by object identity: on the meta device every storage pointer is 0."""
    seen, alias = {}, {}
    for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                   model.named_buffers(remove_duplicate=False)):
        if id(t) in seen:
            alias[name] = seen[id(t)]
        else:
            seen[id(t)] = name
    return alias


class PretrainedMixin:
    """Adds `save_pretrained` / `from_pretrained` to an `nn.Module` with a `config` dataclass."""

    config_class: type = None
    # built on the meta device and loaded by assignment: one copy of the weights in memory, not a random init plus
    # the file's (a model with non-persistent buffers fills them in materialize_meta(), called after loading)
    meta_init: bool = False
    extra_json_fields: tuple[str, ...] = ()  # attributes saved in config.json beside the config

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write config.json and model.safetensors into `path` (created); `dtype` casts float tensors."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        alias = _aliases(state)
        tensors = {key: t for key, t in state.items() if key not in alias}  # cast one at a time, as written
        config = dataclasses.asdict(self.config)
        write_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"}, dtype=dtype)
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    def hub_folder(self, folder: str | os.PathLike, repo_id: str | None = None,
                   dtype: torch.dtype | None = None) -> Path:
        """What push_to_hub uploads, written into `folder`: save_pretrained's files and a short model card."""
        folder = Path(folder)
        self.save_pretrained(folder, dtype=dtype)
        kind, name = type(self).__name__, repo_id or type(self).__name__
        params = sum(p.numel() for p in self.parameters())
        fields = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in dataclasses.asdict(self.config).items()
                           if not isinstance(v, list) or len(v) <= 16)
        intro = f"""One {kind} ({params:,} parameters) of an RQ-VAE + RQ-Transformer image generator ({PAPER}).
Weights are safetensors, the config JSON.

```python
from {type(self).__module__.split(".")[0]} import {kind}
model = {kind}.from_pretrained("{repo_id or 'path/to/this/folder'}")
```"""
        table = f"| config | value |\n|---|---|\n{fields}"
        (folder / CARD_NAME).write_text(model_card(name.split("/")[-1], intro, {"Config": table}), encoding="utf-8")
        return folder

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False,
                    commit_message: str | None = None, dtype: torch.dtype | None = None):
        """Upload this model to Hub model repo `repo_id` (created if needed) as one commit of hub_folder's
        files; `dtype` casts the stored weights. Returns the client's CommitInfo. Needs a write token."""
        return push_written(lambda folder: self.hub_folder(folder, repo_id, dtype), repo_id, token=token,
                            private=private, commit_message=commit_message or f"Upload {type(self).__name__}")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None, *,
                        revision: str | None = None, local_files_only: bool = False, cache_dir=None,
                        token: str | bool | None = None, subfolder: str = ""):
        """Load a model saved by `save_pretrained` (strict: every tensor must match) from a folder or a Hub
        repo id "user/name" (at `revision`; `local_files_only`: from the Hub cache only; `subfolder`, e.g.
        "rqvae" of a saved pipeline). See rqcore.hub_transfer."""
        path = Path(resolve_folder(path, revision=revision, local_files_only=local_files_only,
                                   cache_dir=cache_dir, token=token, subfolder=subfolder))
        if not path.is_dir():
            raise ValueError(f"weights folder {path} does not exist")
        config = load_config(cls.config_class, path)
        with torch.device("meta") if cls.meta_init else contextlib.nullcontext():
            model = cls(config)
        load_weights(model, path / WEIGHTS_NAME, assign=cls.meta_init)
        model.eval()
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "boolean"
    return "floating-point" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


def load_weights(model: torch.nn.Module, file: str | os.PathLike, assign: bool = False, edit=None) -> None:
    """Strictly load a safetensors file into `model`, with errors that name the offending keys. assign: the
    file's tensors become the model's (for a model built on the meta device), not copies into its own.
    edit: a function that changes the file's {name: tensor} in place before it is checked (a new class row)."""
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"no {file.name} found in {file.parent}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
    if edit is not None:
        edit(tensors)
    expected = model.state_dict()
    alias = _aliases(expected) if not assign else _shared_names(model)
    wanted = [k for k in expected if k not in alias]
    missing = [k for k in wanted if k not in tensors]
    unexpected = [k for k in tensors if k not in expected or k in alias]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected tensor(s) {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
        raise ValueError(f"{file} does not match the config: " + "; ".join(parts))
    for key in wanted:
        if tuple(tensors[key].shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{file}: tensor '{key}' has shape {tuple(tensors[key].shape)}, "
                f"the config needs {tuple(expected[key].shape)}"
            )
        if _kind(tensors[key].dtype) != _kind(expected[key].dtype):  # fp16/bf16 for fp32 is fine, int for float not
            raise ValueError(f"{file}: tensor '{key}' has dtype {tensors[key].dtype}, the model needs a "
                             f"{_kind(expected[key].dtype)} tensor ({expected[key].dtype})")
    state = {k: tensors.pop(k).to(expected[k].dtype) for k in wanted}  # popped: a cast frees the file's copy
    state.update({k: state[v] for k, v in alias.items()})
    if assign:
        assign_state(model, state)
    else:
        model.load_state_dict(state, strict=True)


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make `state`'s tensors the weights of `model`, built on the meta device (no copies), then fill what a
    state_dict cannot (non-persistent buffers: the model's materialize_meta(), if it has one)."""
    model.load_state_dict(state, strict=True, assign=True)
    if hasattr(model, "materialize_meta"):
        model.materialize_meta()
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{type(model).__name__} cannot be built on the meta device: {left[:3]} are not "
                         "in its state_dict")  # a bug of the model class, not the file

"""Untrusted files: weights load only from safetensors + JSON, nothing in the shipped code can
unpickle or evaluate data, and paths coming from the UI never leave gradio's upload/cache folders.

The pickles below are live: unpickling one creates a marker folder (checked once, on purpose, in
`test_the_payload_is_live`); every loader must refuse the file without ever creating the marker.
"""
from __future__ import annotations

import ast
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import RQPipeline
from rqtransformer import RQTransformer, RQTransformerConfig
from rqvae import PRESETS, RQVAE, RQVAEConfig
from training.data import image_folder
from training.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"tests", "__pycache__", "node_modules", "build", "dist", "weights", "data"}


# ---- 1. no unpickling or eval in shipped code (AST, so multi-line calls and comments are handled) ----

UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "?")  # "?": a call's result, e.g. Model(...).eval()
    return ".".join(reversed(parts))


def keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_uses(source: str, filename: str = "<src>") -> list[str]:
    """`file:line what` for every unpickling / code-evaluating construct in `source`."""
    tree = ast.parse(source, filename)
    torch_names = {"torch"} | {a.asname for n in ast.walk(tree) if isinstance(n, ast.Import)
                               for a in n.names if a.name == "torch" and a.asname}
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
                found.append(f"{where} imports from {node.module}")
            if node.module.split(".")[0] == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where} imports torch's load (use torch.load(..., weights_only=True))")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            root, _, rest = name.partition(".")
            if name in ("eval", "exec"):
                found.append(f"{where} calls {name}()")
            elif root in torch_names and rest in ("load", "serialization.load") \
                    and not keyword_is(node, "weights_only", True):
                found.append(f"{where} calls {name}() without weights_only=True")
            elif root in torch_names and rest == "jit.load":
                found.append(f"{where} calls {name}() (TorchScript archives carry code)")
            elif name.endswith("read_pickle") or name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                found.append(f"{where} calls {name}()")
            elif name.split(".")[-1] == "load" and keyword_is(node, "allow_pickle", True):
                found.append(f"{where} calls {name}(allow_pickle=True)")
    return found


def shipped_python_files() -> list[Path]:
    out = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        out += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return out


def test_checker_finds_every_kind_of_unsafe_use():
    bad = """
import pickle
import torch as T
from joblib import load
from torch import load as tload
x = T.load(f)
y = torch.load(f, weights_only=False)
z = torch.load(
    f, map_location="cpu")
eval(text); exec(code)
np.load(f, allow_pickle=True)
pd.read_pickle(f)
torch.jit.load(f)
"""
    assert len(unsafe_uses(bad)) == 11, unsafe_uses(bad)
    good = ("import torch\nm.eval()\nModel(c).eval()\nx = torch.load(f, weights_only=True)\nre.compile('x')\n"
            "np.load(f)\n")
    assert unsafe_uses(good) == []


def test_shipped_code_never_unpickles_or_evaluates():
    files = shipped_python_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"app.py", "rqcore/pretrained.py", "training/train_rqtransformer.py", "pipelines/rq_pipeline.py"} <= names
    assert not any(n.startswith(("tests/", ".venv/")) for n in names)
    found = [hit for p in files for hit in unsafe_uses(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert found == [], "\n".join(found)


# ---- 2. a pickle where weights belong is refused, never executed ----------------------------------

class Payload:
    """Unpickling this creates `marker` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def evil_bytes(marker: Path, kind: str) -> bytes:
    if kind == "raw_pickle":
        return pickle.dumps({"decoder.conv_out.weight": Payload(marker)})
    buffer = io.BytesIO()
    torch.save({"decoder.conv_out.weight": Payload(marker)}, buffer)  # torch's zip format (data.pkl inside)
    return buffer.getvalue()


def test_the_payload_is_live(tmp_path):
    pickle.loads(evil_bytes(tmp_path / "a", "raw_pickle"))
    torch.load(io.BytesIO(evil_bytes(tmp_path / "b", "torch_zip")), weights_only=False)
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()  # so the checks below mean something


def tiny_vae() -> RQVAE:
    return RQVAE(RQVAEConfig(**PRESETS["tiny"]))


def tiny_transformer() -> RQTransformer:
    return RQTransformer(RQTransformerConfig(codebook_size=32, code_shape=(2, 2, 2), dim=16, heads=2,
                                             spatial_layers=1, depth_layers=1, num_classes=0, dropout=0.0))


@pytest.mark.parametrize("kind", ["raw_pickle", "torch_zip"])
@pytest.mark.parametrize("model", ["rqvae", "rqtransformer"])
def test_pickle_named_model_safetensors_is_refused(tmp_path, kind, model):
    marker = tmp_path / "pwned"
    folder = tmp_path / model
    (tiny_vae() if model == "rqvae" else tiny_transformer()).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(evil_bytes(marker, kind))
    cls = RQVAE if model == "rqvae" else RQTransformer
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        cls.from_pretrained(folder)
    assert not marker.exists()


def test_bin_files_beside_the_weights_are_never_read(tmp_path):
    marker, folder = tmp_path / "pwned", tmp_path / "rqvae"
    tiny_vae().save_pretrained(folder)
    for name in ("pytorch_model.bin", "model.pt", "model.ckpt"):
        (folder / name).write_bytes(evil_bytes(marker, "torch_zip"))
    RQVAE.from_pretrained(folder)  # the safetensors file is used, the others ignored
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors found"):
        RQVAE.from_pretrained(folder)  # no fallback to the .bin
    assert not marker.exists()


def test_pipeline_and_app_refuse_a_pickled_pipeline(tmp_path):
    import app

    marker, folder = tmp_path / "pwned", tmp_path / "pipe"
    RQPipeline(tiny_vae(), tiny_transformer()).save_pretrained(folder)
    (folder / "rqtransformer" / "pytorch_model.bin").write_bytes(evil_bytes(marker, "torch_zip"))
    (folder / "rqtransformer" / "model.safetensors").write_bytes(evil_bytes(marker, "raw_pickle"))
    with pytest.raises(ValueError, match="rqtransformer/model.safetensors is not a readable safetensors"):
        RQPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="is not a readable safetensors"):
        app.build_demo(folder)
    assert not marker.exists()


def test_pickled_perceptual_weights_and_code_cache_are_refused(tmp_path, image_dir, capsys):
    """The other two files the training scripts read: --perceptual_weights and stage 2's code cache."""
    from training.encoding import encode_dataset
    from training.train_rqvae import main

    marker = tmp_path / "pwned"
    vgg = tmp_path / "vgg16.safetensors"
    vgg.write_bytes(evil_bytes(marker, "raw_pickle"))
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: main(["--data_dir", str(image_dir), "--output_dir", str(tmp_path / "o"), "--config", "tiny",
                              "--perceptual_weight", "1", "--perceptual_weights", str(vgg), "--report_to", "none",
                              "--num_workers", "0"]))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0, err
    assert "is not the VGG16 features as safetensors" in err

    vae_dir = tmp_path / "vae"
    tiny_vae().eval().save_pretrained(vae_dir)
    vae = RQVAE.from_pretrained(vae_dir)
    dataset = image_folder(image_dir, vae.config.resolution)
    codes, labels = encode_dataset(vae, vae_dir, dataset, tmp_path / "cache", False)
    (cache,) = (tmp_path / "cache").glob("codes-*.safetensors")
    cache.write_bytes(evil_bytes(marker, "torch_zip"))  # a planted cache file is re-made, not unpickled
    again, _ = encode_dataset(vae, vae_dir, dataset, tmp_path / "cache", False)
    assert torch.equal(again, codes) and not marker.exists()


def test_resuming_a_strangers_checkpoint_runs_no_code(tmp_path, image_dir):
    from training.train_rqvae import main

    out, marker = tmp_path / "run", tmp_path / "pwned"
    argv = ["--data_dir", str(image_dir), "--output_dir", str(out), "--config", "tiny", "--report_to", "none",
            "--num_workers", "0", "--train_batch_size", "4", "--num_validation_images", "4",
            "--checkpointing_steps", "1", "--max_train_steps", "1"]
    main(argv)
    planted = [out / "checkpoint-1" / "custom_checkpoint_0.pkl"]  # where accelerate would keep a pickled EMA
    planted += [p for p in (out / "checkpoint-1").iterdir() if p.suffix in (".bin", ".pkl")]
    assert len(planted) >= 4  # optimizer, scheduler, sampler, RNG states
    for file in planted:
        torch.save({"x": Payload(marker)}, file)
    try:
        main([*argv[:-1], "2", "--resume_from_checkpoint", "latest"])
    except Exception:  # noqa: BLE001 - only whether the payload ran matters here
        pass
    assert not marker.exists()


# ---- 3. the app's files stay inside gradio's folders -----------------------------------------------

gr = pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")
from gradio_client import Client, handle_file  # noqa: E402


def upload_folder() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def inside(path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder)


def file_paths(value) -> list[str]:
    """Every FileData path in an endpoint's raw output."""
    if isinstance(value, dict):
        own = [value["path"]] if isinstance(value.get("path"), str) else []
        return own + [p for v in value.values() for p in file_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in file_paths(v)]
    return []


def raw_call(url: str, api: str, data: list) -> tuple[str, object]:
    """POST /gradio_api/call/<api> with a raw payload (no client-side upload); (event, data) of the result."""
    r = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=30)
    r.raise_for_status()
    with httpx.stream("GET", f"{url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=120) as stream:
        text = "".join(stream.iter_text())
    events = [(block.split("\n")[0].removeprefix("event: "), block.split("data: ", 1)[1])
              for block in text.strip().split("\n\n") if "data: " in block]
    event, payload = [e for e in events if e[0] in ("complete", "error")][-1]
    return event, json.loads(payload)


def test_outputs_are_written_inside_gradios_cache(served, files):
    client, *_ = served
    raw = Client(client.src, verbose=False, download_files=False)
    cache = upload_folder()
    outputs = [raw.predict(num_images=2, api_name="/generate"),
               raw.predict(handle_file(files["good"]), api_name="/reconstruct"),
               raw.predict({"background": handle_file(files["good"]), "layers": [handle_file(files["mask"])],
                            "composite": None}, num_images=1, api_name="/complete")]
    paths = file_paths(outputs)
    assert len(paths) == 2 + 4 + 2  # images; depth strip + code grid; shaded input + completion
    assert all(inside(p, cache) for p in paths), (cache, paths)


def test_upload_names_cannot_escape_the_upload_folder(served):
    client, *_ = served
    url, cache = client.src, upload_folder()
    buffer = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(buffer, "PNG")
    names = ["../../evil.png", "/tmp/evil-absolute.png", "..\\..\\evil-windows.png", "%2e%2e/%2e%2e/evil-enc.png"]
    watch = [cache.parent, cache.parent.parent, ROOT, Path.cwd()]
    before = {p for d in watch for p in d.glob("evil*.png")}
    for name in names:
        r = httpx.post(f"{url}gradio_api/upload", files=[("files", (name, buffer.getvalue(), "image/png"))])
        assert r.status_code == 200, r.text
        (stored,) = r.json()
        assert inside(stored, cache) and ".." not in Path(stored).relative_to(cache).parts, stored
        event, result = raw_call(url, "reconstruct", [{"path": stored, "orig_name": name,
                                                       "meta": {"_type": "gradio.FileData"}}])
        assert event == "complete", result
        assert all(inside(p, cache) for p in file_paths(result))
    assert {p for d in watch for p in d.glob("evil*.png")} == before  # nothing written outside


def test_server_files_outside_the_upload_folder_are_refused(served, tmp_path):
    client, weights, _ = served
    url = client.src
    secret = tmp_path / "secret.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(secret)
    for path in (secret, weights / "rqvae" / "config.json", Path("/etc/passwd")):
        event, result = raw_call(url, "reconstruct", [{"path": str(path), "meta": {"_type": "gradio.FileData"}}])
        assert event == "error" and "not uploaded by a user" in str(result), result
        editor = {"background": {"path": str(path), "meta": {"_type": "gradio.FileData"}}, "layers": [],
                  "composite": None}
        event, result = raw_call(url, "complete", [editor, "Random class", 1, 0, True, 0.0, 0.0, 1.0, 1.0, ""])
        assert event == "error" and "not uploaded by a user" in str(result), result
        assert httpx.get(f"{url}gradio_api/file={path}").status_code == 403  # nor downloadable
    assert len(client.predict(num_images=1, api_name="/generate")) == 1

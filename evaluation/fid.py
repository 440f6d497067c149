"""The paper's metrics: FID and IS with the Inception network its statistics were made with (pytorch-fid's
FID Inception, the weights file pt_inception-2015-12-05-6726825d.pth that pytorch-fid and the official code
download), through pytorch-fid's own model, activations and Frechet distance.

A weights file given by the user is read only by a weights-only load (tensors, nothing that runs code): the
model is then built by pytorch-fid from a copy written by us, because pytorch-fid's own loader unpickles.
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # the name pytorch-fid caches it under
DIMS = 2048  # the pool features the official statistics hold
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def read_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """The Inception state dict of a .pth (weights-only load) or .safetensors file, or one line."""
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"--inception_weights {file} does not exist (pytorch-fid's {FID_WEIGHTS_NAME})")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"--inception_weights {file} is not a readable safetensors file ({e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler's refusals and corrupt files alike
        import re

        what = re.search(r"Unsupported [^.\n]*", str(e))  # e.g. "Unsupported global: GLOBAL posix.system"
        why = what.group(0) if what else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--inception_weights {file} was refused by a weights-only load, so it was not read "
                         f"({why[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--inception_weights {file} is not a mapping of names to tensors")
    if "fc.weight" not in state or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(f"--inception_weights {file} is not the FID Inception's state dict ({FID_WEIGHTS_NAME})")
    return state


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the layout of pytorch-fid's weights file (torchvision's Inception3 names, 1,008
    classes), batch-norm statistics from a few random images: for benchmarks and tests without a network."""
    from torchvision.models import Inception3

    torch.manual_seed(seed)
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=True)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: the statistics of the images below, not of init
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 299, 299) * 2 - 1)
    return net.state_dict()


@contextlib.contextmanager
def _hub_dir(folder: str):
    old = torch.hub.get_dir()
    torch.hub.set_dir(folder)
    try:
        yield
    finally:
        torch.hub.set_dir(old)


class Inception:
    """pytorch-fid's InceptionV3 (2048-d pool features) and the classifier the IS needs (fc of the same file)."""

    def __init__(self, weights_file: str | Path | None = None, device: str | torch.device = "cpu"):
        from pytorch_fid.inception import InceptionV3

        block = InceptionV3.BLOCK_INDEX_BY_DIM[DIMS]
        if weights_file is None:
            try:  # pytorch-fid downloads into the torch hub cache once
                self.model = InceptionV3([block])
            except Exception as e:  # noqa: BLE001 - urllib's and torch.hub's errors alike
                raise ValueError(f"could not get the FID Inception weights ({type(e).__name__}: "
                                 f"{str(e)[:120]}): pass --inception_weights {FID_WEIGHTS_NAME}") from None
            state = read_weights(Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME)
        else:
            state = read_weights(weights_file)
            with tempfile.TemporaryDirectory(prefix="fid-inception-") as tmp, _hub_dir(tmp):
                (Path(tmp) / "checkpoints").mkdir()
                torch.save(dict(state), Path(tmp) / "checkpoints" / FID_WEIGHTS_NAME)  # ours: safe to unpickle
                self.model = InceptionV3([block])
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.fc = (state["fc.weight"].double().numpy(), state["fc.bias"].double().numpy())  # [1008, 2048], [1008]

    def activations(self, files: list[Path], batch_size: int = 50) -> np.ndarray:
        """[N, 2048] pool features of image files, by pytorch-fid's own loader, resizing and batching."""
        from pytorch_fid.fid_score import get_activations

        if not files:
            return np.zeros((0, DIMS), np.float32)
        with torch.inference_mode():
            return get_activations([str(f) for f in files], self.model, min(batch_size, len(files)), DIMS,
                                   self.device, num_workers=0)

    def class_probabilities(self, acts: np.ndarray) -> np.ndarray:
        """p(y|x) over the 1,008 Inception classes: softmax of fc(pool features), as the official IS takes it."""
        weight, bias = self.fc
        logits = acts.astype(np.float64) @ weight.T + bias
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)


def statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as pytorch-fid computes them."""
    if len(acts) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(acts)}")
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def read_stats(file: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """mu, sigma of a statistics .npz (pytorch-fid's and the official files' keys), read without pickles."""
    file = Path(file)
    try:
        with np.load(file, allow_pickle=False) as data:
            if not {"mu", "sigma"} <= set(data.files):
                raise ValueError(f"--ref {file} has no 'mu' and 'sigma' (it has {sorted(data.files)})")
            mu, sigma = data["mu"], data["sigma"]
    except (OSError, EOFError) as e:
        raise ValueError(f"--ref {file} is not a readable .npz ({type(e).__name__})") from None
    except ValueError as e:
        if str(e).startswith("--ref"):
            raise
        raise ValueError(f"--ref {file} is not a plain .npz ({str(e)[:120]})") from None
    if mu.shape != (DIMS,) or sigma.shape != (DIMS, DIMS):
        raise ValueError(f"--ref {file}: mu {mu.shape} and sigma {sigma.shape} are not the 2048-d Inception "
                         "features' statistics")
    return mu, sigma


def frechet(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(a[0], a[1], b[0], b[1]))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E KL(p(y|x) || p(y))) over `splits` equal parts -> (mean, std), as the official IS (StudioGAN's)."""
    n = len(probs)
    if n < splits:
        raise ValueError(f"the Inception score needs at least {splits} images, got {n}")
    scores = []
    for j in range(splits):
        part = probs[j * n // splits:(j + 1) * n // splits]
        kl = part * (np.log(part + 1e-30) - np.log(part.mean(0, keepdims=True) + 1e-30))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores, ddof=1)) if splits > 1 else 0.0


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files

"""Stage 2's data: every image encoded once with the frozen RQ-VAE into its code stack (and latents),
cached in the output folder under a key of the RQ-VAE weights and the image files."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from rqcore.pretrained import WEIGHTS_NAME, write_safetensors
from rqvae import RQVAE


def cache_key(vae_dir: Path, dataset, hflip: bool, latents: bool = False, index: bool = False) -> str:
    """Changes when the RQ-VAE weights, the image files (a datasets split: its fingerprint), the flip setting
    or the cached content change."""
    h = hashlib.sha256()
    for name in ("config.json", WEIGHTS_NAME):
        h.update((vae_dir / name).read_bytes())
    fingerprint = getattr(dataset, "fingerprint", None)
    if fingerprint is not None:  # rows of a datasets split have no files to stat; datasets hashes their content
        h.update(f"fingerprint={fingerprint}|rows={len(dataset.samples)}\n".encode())
    else:
        for path, label in dataset.samples:
            st = Path(path).stat()
            h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"hflip={hflip}|classes={dataset.classes}".encode() + (b"|latents" if latents else b"")
             + (b"|index" if index else b""))
    return h.hexdigest()[:16]


BATCH = 64  # images per encoding batch; shards start on batch boundaries, so rows come out in one order


@torch.no_grad()
def encode_dataset(vae: RQVAE, vae_dir: Path, dataset, cache_dir: Path, hflip: bool, accelerator=None,
                   latents: bool = False, index: bool = False):
    """An image_folder dataset -> (codes [N,h,w,D] int64, labels [N]) + (latents [N,h,w,C] fp32,) with
    `latents` + (index [N],) with `index`; from the cache when it is current. Latents (16 KB per 8x8x64
    image) are what stochastic codes and soft labels are drawn from every step; codes are always the
    deterministic ones. index: the item of `dataset` each row encodes (its flip too, with `hflip`).

    With an `accelerator` of N processes every process encodes 1/N of the batches, the shards are
    gathered in order (the rows are those one process would make), and the main process alone shows a
    progress bar and writes the cache. Every process must call this together."""
    file = cache_dir / f"codes-{cache_key(vae_dir, dataset, hflip, latents, index)}.safetensors"
    names = ("codes", "labels") + (("latents",) if latents else ()) + (("index",) if index else ())
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    cached = file.is_file()
    if world > 1:  # process 0's file and decision for all, as they encode together (a shared file system
        # may lag, and nodes with their own copy of the data may see other file times, hence other keys)
        file, cached = broadcast_object_list([file, cached])
    if cached:
        try:
            data = load_file(str(file))
            return tuple(data[name].long() if name != "latents" else data[name] for name in names)
        except (SafetensorError, OSError, KeyError):
            if world > 1:
                raise ValueError(f"the code cache {file} is unreadable: delete it and start again") from None
            # unreadable cache: encode again
    batches = -(-len(dataset) // BATCH)
    first, last = batches * rank // world * BATCH, min(len(dataset), batches * (rank + 1) // world * BATCH)
    loader = DataLoader(Subset(dataset, range(first, last)), batch_size=BATCH, num_workers=0)
    parts = {name: [] for name in names}
    device = next(vae.parameters()).device
    done, started = first, time.perf_counter()
    for images, y, *_ in tqdm(loader, desc=f"encoding {Path(dataset.root).name}", disable=rank != 0):
        images = images.to(device)
        for view in ([images, images.flip(-1)] if hflip else [images]):
            z = vae.encode_latents(view)  # [B,h,w,C]
            parts["codes"].append(vae.quantize_latents(z).cpu())  # the nearest codes, exactly encode()'s
            parts["labels"].append(y)
            if latents:
                parts["latents"].append(z.cpu())
            if index:
                parts["index"].append(torch.arange(done, done + len(y)))
        done += len(y)
    h, w, d = vae.code_shape  # an empty shard (fewer batches than processes) still has the rows' shape
    empty = dict(codes=torch.empty(0, h, w, d, dtype=torch.long), labels=torch.empty(0, dtype=torch.long),
                 latents=torch.empty(0, h, w, vae.config.latent_dim), index=torch.empty(0, dtype=torch.long))
    data = {name: torch.cat(chunks) if chunks else empty[name] for name, chunks in parts.items()}
    if world > 1:
        data = {name: gather_shards(accelerator, t) for name, t in data.items()}
    seconds = time.perf_counter() - started
    if rank == 0:
        print(f"encoded {len(dataset)} images in {seconds:.1f} s ({len(dataset) / seconds:.1f} images/s, "
              f"{world} process{'es' if world > 1 else ''})")
        cache_dir.mkdir(parents=True, exist_ok=True)
        dtype = torch.int16 if vae.config.codebook_size <= 32767 else torch.int32
        write_safetensors({**data, "codes": data["codes"].to(dtype)}, file,
                          metadata={"classes": json.dumps(dataset.classes), "data_dir": str(dataset.root)})
    return tuple(data[name] for name in names)


def gather_shards(accelerator, shard: torch.Tensor) -> torch.Tensor:
    """Every process's rows, in process order, on every process. Shards may differ in length (and be
    empty), which the collective does not allow: pad to the longest, gather, cut the padding off."""
    sizes = accelerator.gather(torch.tensor([len(shard)], device=accelerator.device)).tolist()
    longest = max(sizes)
    padded = torch.zeros((longest, *shard.shape[1:]), dtype=shard.dtype, device=accelerator.device)
    padded[:len(shard)] = shard
    gathered = accelerator.gather(padded).cpu()  # [world * longest, ...]
    return torch.cat([gathered[r * longest:r * longest + n] for r, n in enumerate(sizes)])

"""RQPipeline.push_to_hub: the folder it uploads (save_pretrained's files + a model card + examples) and the
upload. Loading from the Hub is rqcore.hub_transfer.resolve_folder, used by every from_pretrained."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from rqcore import cards
from rqcore.hub_transfer import push_written



def count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()):,}"


def model_card(pipe, repo_id: str | None = None) -> str:
    """A short model card from the pipeline's facts, for a pipeline that came without one."""
    vc, tc = pipe.rqvae.config, pipe.transformer.config
    h, w, D = vc.code_shape
    names = pipe.class_names if tc.num_classes else []
    shown = ", ".join(f"`{n}`" for n in names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    conditioning = "; ".join(filter(None, [f"{len(names)} classes ({shown})" if names else "",
                                           f"text prompts of up to {tc.max_text_len} tokens" if pipe.has_text else ""]))
    if names:
        call = f"pipe({json.dumps(names[0])}, num_images=4, generator=torch.Generator().manual_seed(0))"
    elif pipe.has_text:
        prompt = json.dumps(pipe.prompts[0] if pipe.prompts else "a photo", ensure_ascii=False)
        call = f"pipe(prompt={prompt}, num_images=4, generator=torch.Generator().manual_seed(0))"
    else:
        call = "pipe(num_images=4, generator=torch.Generator().manual_seed(0))"
    layers = f"dim {tc.dim}, {tc.heads} heads, {tc.spatial_layers} spatial + {tc.depth_layers} depth layers"
    intro = f"""An image generator with residual quantization ({cards.PAPER}): an RQ-VAE turns images into stacks
of codes and an autoregressive RQ-Transformer samples new stacks. Weights are safetensors, configs JSON.

| part | facts |
|---|---|
| images | {vc.resolution} px |
| codes | {h}×{w}×{D} from one shared codebook of {vc.codebook_size} |
| `rqvae/` | {count(pipe.rqvae)} parameters, latent dim {vc.latent_dim} |
| `rqtransformer/` | {count(pipe.transformer)} parameters: {layers} |
| conditioning | {conditioning or "none (unconditional)"} |"""
    use = f"""```python
import torch
from pipelines import RQPipeline

pipe = RQPipeline.from_pretrained("{repo_id or "path/to/this/folder"}")
images = {call}.images
```"""
    return cards.model_card((repo_id or "RQ-VAE + RQ-Transformer").split("/")[-1], intro, {"Use": use})


def hub_folder(pipe, folder, repo_id: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write what push_to_hub uploads into `folder`: save_pretrained's files, then the model card and
    examples/*.png of the folder the pipeline was loaded from, or a card written by model_card."""
    folder = Path(folder)
    pipe.save_pretrained(folder, dtype=dtype)
    source = pipe.folder
    if source is not None and (source / cards.CARD_NAME).is_file():
        shutil.copyfile(source / cards.CARD_NAME, folder / cards.CARD_NAME)
    else:
        (folder / cards.CARD_NAME).write_text(model_card(pipe, repo_id), encoding="utf-8")
    examples = sorted((source / "examples").glob("*.png")) if source is not None else []
    if examples:
        (folder / "examples").mkdir(exist_ok=True)
        for file in examples:
            shutil.copyfile(file, folder / "examples" / file.name)
    return folder


def push_to_hub(pipe, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload RQPipeline", dtype: torch.dtype | None = None):
    """Upload the pipeline to Hub model repo `repo_id` (created if needed, `private` then), as one commit of
    hub_folder's files; `dtype` (e.g. torch.float16) casts the stored weights. Returns the client's
    CommitInfo. Needs a write token: `token=` or a login."""
    return push_written(lambda folder: hub_folder(pipe, folder, repo_id, dtype), repo_id, token=token,
                        private=private, commit_message=commit_message)

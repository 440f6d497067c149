"""RQPipeline: class-conditional generation, streamed previews, per-depth reconstruction and masked
completion over a trained RQ-VAE + RQ-Transformer pair. The pipeline checks all user input (class names and
indices, counts, images, masks, generator, output type); the transformer's generate() checks the sampling
options and tensor invariants.

    pipe = RQPipeline.from_pretrained("weights/emoji-64")
    images = pipe("smileys_and_emotion", num_images=4, generator=torch.Generator().manual_seed(0)).images
"""
from __future__ import annotations

import difflib
import json
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import repeat
from PIL import Image

from rqcore.images import check_pixels, image_transform, to_pil, to_rgb
from rqcore.metrics import psnr
from rqtransformer import RQTransformer
from rqvae import RQVAE

PIPELINE_FILE = "pipeline.json"
OUTPUT_TYPES = ("pil", "pt", "np")
MAX_IMAGES_LIMIT = 64  # per request; a pipeline.json from elsewhere cannot raise the app's cap beyond this
SAMPLING_THREAD = "RQPipeline.stream"  # the worker thread of stream(), named so that it can be found


@dataclass
class RQPipelineOutput:
    images: Any                      # list of PIL images, or a tensor/array [B,3,H,W] in [0,1]
    codes: torch.Tensor              # LongTensor [B,h,w,D]
    class_labels: list[int] | None = None
    done: float = 1.0                # fraction of positions sampled (previews < 1)
    keep_mask: torch.Tensor | None = None     # complete(): BoolTensor [h,w], True = code position kept
    input_image: Image.Image | None = field(repr=False, default=None)  # complete(): the input as the model saw it


@dataclass
class Reconstruction:
    images: list[Image.Image]        # one per depth 1..D
    psnr: list[float]                # dB against the (resized) input, per depth
    codes: torch.Tensor              # LongTensor [h,w,D]
    input_image: Image.Image = field(repr=False, default=None)  # the input as the model saw it


class _Cancelled(Exception):
    pass


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class RQPipeline:
    def __init__(self, rqvae: RQVAE, transformer: RQTransformer, max_images: int = 16,
                 default_guidance_scale: float = 3.0):
        tc, vc = transformer.config, rqvae.config
        if tc.codebook_size != vc.codebook_size or tuple(tc.code_shape) != vc.code_shape:
            raise ValueError(f"the transformer expects codes {tuple(tc.code_shape)} from a codebook of "
                             f"{tc.codebook_size}, the RQ-VAE makes {vc.code_shape} from {vc.codebook_size}")
        if isinstance(max_images, bool) or not isinstance(max_images, int) or not 1 <= max_images <= MAX_IMAGES_LIMIT:
            raise ValueError(f"max_images must be a positive integer <= {MAX_IMAGES_LIMIT}, got {max_images!r}")
        if isinstance(default_guidance_scale, bool) or not isinstance(default_guidance_scale, (int, float)) \
                or not 0 <= default_guidance_scale < float("inf"):
            raise ValueError(f"default_guidance_scale must be a number >= 0 (1 = no guidance), "
                             f"got {default_guidance_scale!r}")
        self.rqvae, self.transformer = rqvae.eval(), transformer.eval()
        self.max_images, self.default_guidance_scale = max_images, float(default_guidance_scale)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "RQPipeline":
        path = Path(path)
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise ValueError(f"pipeline folder {path} {what} (expected rqvae/ and rqtransformer/ inside)")
        for sub in ("rqvae", "rqtransformer"):
            if not (path / sub).is_dir():
                raise ValueError(f"{path} has no {sub}/ folder: not a saved RQPipeline")
        options = {}
        if (path / PIPELINE_FILE).is_file():
            try:
                options = json.loads((path / PIPELINE_FILE).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path / PIPELINE_FILE} is not valid JSON: {e}") from None
            if not isinstance(options, dict):
                raise ValueError(f"{path / PIPELINE_FILE}: expected a JSON object with max_images and/or "
                                 f"default_guidance_scale, got {type(options).__name__}")
            unknown = set(options) - {"max_images", "default_guidance_scale"}
            if unknown:
                raise ValueError(f"{path / PIPELINE_FILE}: unexpected content {sorted(map(str, unknown))}")
        rqvae = RQVAE.from_pretrained(path / "rqvae")
        transformer = RQTransformer.from_pretrained(path / "rqtransformer")
        try:
            pipe = cls(rqvae, transformer, **options)
        except ValueError as e:  # options of pipeline.json, or a transformer made for another RQ-VAE
            raise ValueError(f"{path}: {e}") from None
        return pipe.to(device or default_device(), dtype)

    def save_pretrained(self, path, dtype: torch.dtype | None = None) -> None:
        path = Path(path)
        self.rqvae.save_pretrained(path / "rqvae", dtype=dtype)
        self.transformer.save_pretrained(path / "rqtransformer", dtype=dtype)
        options = {"max_images": self.max_images, "default_guidance_scale": self.default_guidance_scale}
        (path / PIPELINE_FILE).write_text(json.dumps(options, indent=2) + "\n")

    def to(self, device=None, dtype=None) -> "RQPipeline":
        """Move both models to `device`; `dtype` (e.g. torch.bfloat16 on a GPU) is the transformer's.

        The RQ-VAE stays float32: it is small, and its nearest-code search needs the precision."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.rqvae.to(device=device)
        self.transformer.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.head.weight.device

    @property
    def class_names(self) -> list[str]:
        c = self.transformer.config
        return list(c.class_names) or [str(i) for i in range(c.num_classes)]

    @property
    def resolution(self) -> int:
        return self.rqvae.config.resolution

    # ---- input checks -------------------------------------------------------------------------

    def _class_labels(self, class_labels, num_images) -> tuple[torch.Tensor | None, int]:
        """Class names/indices and num_images -> (labels LongTensor [B] or None for no class, B).

        One label is repeated num_images times (default 1); several labels make one image each, so
        num_images must then be None or their count."""
        m = self.max_images
        if num_images is not None and not (_is_whole(num_images) and 1 <= num_images <= m):
            raise ValueError(f"num_images must be a whole number from 1 to {m} (or None: one image per label), "
                             f"got {num_images!r}")
        if class_labels is None:
            return None, int(num_images or 1)
        if self.transformer.config.num_classes == 0:
            raise ValueError("this model is unconditional: leave class_labels empty (None)")
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            if class_labels.ndim > 1:
                raise ValueError(f"class labels must be one name or index per image (1-D), "
                                 f"got shape {tuple(class_labels.shape)}")
            items = class_labels.reshape(-1).tolist()
        else:
            items = list(class_labels) if isinstance(class_labels, (list, tuple)) else [class_labels]
        if not 1 <= len(items) <= m:
            raise ValueError(f"give 1 to {m} class labels, got {len(items)}")
        indices = [self._class_index(item) for item in items]
        if len(indices) == 1:
            indices *= int(num_images or 1)
        elif num_images is not None and num_images != len(indices):
            raise ValueError(f"{len(indices)} class labels but num_images={num_images}: give one label to repeat, "
                             f"or one per image (and leave num_images None)")
        return torch.tensor(indices, dtype=torch.long, device=self.device), len(indices)

    def _class_index(self, label) -> int:
        names = self.class_names
        if isinstance(label, str):
            if label not in names:
                close = difflib.get_close_matches(label, names, n=3)
                hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
                shown = names if len(names) <= 20 else names[:20] + [f"... ({len(names)} classes in class_names)"]
                raise ValueError(f"unknown class {label!r}; {hint}choose one of {shown}")
            return names.index(label)
        if not _is_whole(label):
            raise ValueError(f"class labels must be class names or indices, got {label!r}")
        if not 0 <= label < len(names):
            raise ValueError(f"class index {label} is out of range 0..{len(names) - 1}")
        return int(label)

    def _generate_kwargs(self, class_labels, num_images, guidance_scale, generator, output_type,
                         **options) -> dict:
        """Checked user input -> keyword arguments for transformer.generate, which checks the sampling
        `options` (temperature, top_k, top_p) and the guidance scale itself."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        labels, batch = self._class_labels(class_labels, num_images)
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale  # without labels generate() ignores it (but checks it)
        return dict(class_labels=labels, num_samples=batch, guidance_scale=guidance_scale, generator=generator,
                    **options)

    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s), uint8 arrays [H,W,C] or float tensors [B,3,H,W] in [-1,1] -> [B,3,R,R] in [-1,1].

        Any size is accepted: images are resized (shorter side) and center-cropped to the model's
        resolution; any PIL mode is converted to RGB (transparency on white)."""
        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("no image given")
        if torch.is_tensor(images):
            x = images[None] if images.ndim == 3 else images
            if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
                raise ValueError(f"image tensors must be float [B,3,H,W] in [-1,1], got {tuple(x.shape)} {x.dtype}")
            if x.numel() == 0:
                raise ValueError(f"image tensor is empty: {tuple(x.shape)}")
            if x.shape[-2:] != (self.resolution, self.resolution):
                x = F.interpolate(x.float(), size=(self.resolution,) * 2, mode="bicubic", antialias=True,
                                  align_corners=False)
            return x.clamp(-1, 1).to(self.device)
        transform = image_transform(self.resolution)
        out = []
        for item in items:
            if isinstance(item, np.ndarray):
                if item.dtype != np.uint8 or item.ndim not in (2, 3):
                    raise ValueError(f"image arrays must be uint8 [H,W] or [H,W,C], got {item.dtype} {item.shape}")
                item = Image.fromarray(item)
            if not isinstance(item, Image.Image):
                raise ValueError(f"expected a PIL image, a uint8 array or a tensor, got {type(item).__name__}")
            check_pixels(item.width, item.height, "image")  # before decoding: a lazily opened file is not read yet
            if min(item.size) < 1:
                raise ValueError("image is empty")
            out.append(transform(to_rgb(item)))
        return torch.stack(out).to(self.device)

    def _one_image(self, image, what: str) -> torch.Tensor:
        x = self.preprocess(image)  # [B,3,R,R]
        if x.shape[0] != 1:
            raise ValueError(f"{what} takes one image, got {x.shape[0]}")
        return x

    def _as_output_type(self, images: torch.Tensor, output_type: str):
        if output_type == "pil":
            return to_pil(images)
        x = (images.float().clamp(-1, 1) * 0.5 + 0.5).cpu()
        return x if output_type == "pt" else x.numpy()

    # ---- generation ---------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, class_labels=None, num_images: int | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil") -> RQPipelineOutput:
        """Sample images of `class_labels` (a class name or index, or a list of them: one image each).
        num_images repeats a single label (None: once), or sets the count without labels (unconditional).
        guidance_scale None = the pipeline's default, 1 = off."""
        kwargs = self._generate_kwargs(class_labels, num_images, guidance_scale, generator, output_type,
                                       temperature=temperature, top_k=top_k, top_p=top_p)
        *_, final = self._sample(kwargs, output_type)
        return final

    def stream(self, class_labels=None, num_images: int | None = None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, guidance_scale: float | None = None,
               generator: torch.Generator | None = None, output_type: str = "pil", every: int | None = None):
        """Like __call__, but yields a preview after every `every` positions (default: every code row):
        sampled positions decoded, the rest grey. The last item is the final output (done == 1).
        Closing the stream early stops the sampling."""
        kwargs = self._generate_kwargs(class_labels, num_images, guidance_scale, generator, output_type,
                                       temperature=temperature, top_k=top_k, top_p=top_p)
        w = self.rqvae.code_shape[1]
        if every is not None and not (_is_whole(every) and every >= 1):
            raise ValueError(f"every must be a positive whole number of positions (None: every code row, {w}), "
                             f"got {every!r}")
        yield from self._sample(kwargs, output_type, every=int(every or w))

    def _sample(self, kwargs: dict, output_type: str, every: int | None = None):
        """generate(**kwargs), decoded; with `every`, previews first (sampling then runs in a thread)."""
        labels = None if kwargs["class_labels"] is None else kwargs["class_labels"].tolist()
        if every is None:
            codes = self.transformer.generate(**kwargs)
        else:
            for step, partial in self._sample_in_thread(kwargs, every):
                if step is None:
                    codes = partial
                    break
                yield self._preview(partial, step, labels, output_type)
        with torch.inference_mode():
            images = self.rqvae.decode(codes)
        yield RQPipelineOutput(self._as_output_type(images, output_type), codes.cpu(), labels)

    def _sample_in_thread(self, kwargs, every: int):
        """Run generate() in a worker thread; yield (step, codes so far), then (None, final codes).

        The queue holds one item, so the worker runs at most a preview ahead of the consumer: when the
        consumer stops (closes the stream, or drops it), sampling stops within a preview."""
        h, w, _ = self.rqvae.code_shape
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def callback(step, codes):
            if stop.is_set():
                raise _Cancelled  # the consumer went away: stop sampling early
            if step % every == 0 and step < h * w:
                q.put((step, codes))

        def work():
            try:
                q.put((None, self.transformer.generate(**kwargs, callback=callback)))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
                q.put((e, None))

        thread = threading.Thread(target=work, name=SAMPLING_THREAD, daemon=True)
        thread.start()
        try:
            while True:
                step, item = q.get()
                if isinstance(step, BaseException):
                    raise step
                yield step, item
                if step is None:
                    return
        finally:
            stop.set()
            while thread.is_alive():  # take what the worker is waiting to hand over, so that it sees `stop`
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()

    @torch.inference_mode()
    def _preview(self, codes: torch.Tensor, step: int, labels, output_type) -> RQPipelineOutput:
        """Decode the sampled positions; positions not sampled yet are shown grey."""
        f = self.rqvae.config.downsample
        known = (codes >= 0).all(-1)  # [B,h,w]
        images = self.rqvae.decode(codes.clamp(min=0))
        mask = repeat(known, "b h w -> b 1 (h f1) (w f2)", f1=f, f2=f)
        images = torch.where(mask, images, torch.zeros_like(images))  # 0 = mid grey in [-1,1]
        h, w, _ = self.rqvae.code_shape
        return RQPipelineOutput(self._as_output_type(images, output_type), codes.cpu(), labels, done=step / (h * w))

    # ---- reconstruction and completion --------------------------------------------------------

    @torch.inference_mode()
    def reconstruct(self, image) -> Reconstruction:
        """One image -> its reconstructions from the first 1..D codes of each position, with the PSNR (dB)
        of each against the input as the model saw it (resized and center-cropped)."""
        x = self._one_image(image, "reconstruct")  # [1,3,R,R]
        codes = self.rqvae.encode(x)  # [1,h,w,D]
        D = self.rqvae.config.code_depth
        outs = torch.cat([self.rqvae.decode(codes, depth=k) for k in range(1, D + 1)])  # [D,3,R,R]
        return Reconstruction(to_pil(outs), psnr(outs, x).tolist(), codes[0].cpu(), to_pil(x)[0])

    def mask_to_keep(self, mask) -> torch.Tensor:
        """Pixel mask (white = regenerate) -> keep-mask over code positions [h,w] (True = keep)."""
        if torch.is_tensor(mask):
            mask = mask.detach().cpu().float().numpy()
        if isinstance(mask, np.ndarray):
            if mask.size == 0:
                raise ValueError(f"mask is empty: shape {mask.shape}")
            mask = mask.astype(np.float32)
            mask = mask * 255 if mask.max() <= 1 else mask  # 0/1 (or bool) masks: 1 = regenerate
            if mask.ndim == 3:
                mask = mask.max(-1) if mask.shape[-1] in (1, 3, 4) else mask[0]
            if mask.ndim != 2:
                raise ValueError(f"mask must be a single-channel image [H,W], got shape {mask.shape}")
            mask = Image.fromarray(mask.clip(0, 255).astype(np.uint8))
        if not isinstance(mask, Image.Image):
            raise ValueError(f"mask must be a PIL image, an array or a tensor, got {type(mask).__name__}")
        check_pixels(mask.width, mask.height, "mask")  # before any decoding, as for images
        if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            alpha = mask.convert("RGBA").getchannel("A")
            # strokes painted on a transparent layer: the alpha is the mask; an opaque image: its brightness
            mask = alpha if alpha.getextrema()[0] < 255 else mask.convert("RGB")
        mask = mask.convert("L")
        grey = image_transform(self.resolution)(mask.convert("RGB"))[:1]  # [1,R,R] in [-1,1]
        f = self.rqvae.config.downsample
        # a low threshold: thin anti-aliased strokes get faint once resized, and still mean "regenerate"
        touched = F.max_pool2d((grey > -0.8).float()[None], f)[0, 0] > 0  # [h,w]: any painted pixel in the patch
        if not touched.any():
            if mask.getextrema()[1] > 25:  # painted, but lost to the crop (or too thin after resizing)
                raise ValueError(f"the painted region disappears when the image is resized and center-cropped "
                                 f"to {self.resolution}x{self.resolution}: it lies outside the centre square "
                                 f"or is too thin; paint a larger region nearer the centre")
            raise ValueError("the mask is empty: paint (white) the region to regenerate")
        return ~touched

    @torch.inference_mode()
    def complete(self, image, mask, class_labels=None, num_images: int | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil") -> RQPipelineOutput:
        """Regenerate the code positions under the white (painted) part of `mask`, keeping the others' codes.

        Checks the image, then the mask, then the rest (as __call__). The output also holds `keep_mask`
        [h,w] (True = kept) and `input_image` (the input as the model saw it), e.g. to show the regenerated cells."""
        x = self._one_image(image, "complete")  # [1,3,R,R]
        keep = self.mask_to_keep(mask).to(self.device)  # [h,w]
        kwargs = self._generate_kwargs(class_labels, num_images, guidance_scale, generator, output_type,
                                       temperature=temperature, top_k=top_k, top_p=top_p)
        codes = self.rqvae.encode(x)  # [1,h,w,D]
        *_, final = self._sample({**kwargs, "prefix": (codes, keep[None])}, output_type)
        final.keep_mask, final.input_image = keep.cpu(), to_pil(x)[0]
        return final

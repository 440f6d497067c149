"""RQPipeline: class- and/or text-conditional generation, streamed previews, per-depth reconstruction and
masked completion over a trained RQ-VAE + RQ-Transformer pair. The pipeline checks all user input (class
names and indices, prompts, counts, images, masks, generator, output type; see inputs.py and pixels.py); the
transformer's generate() checks the sampling options and tensor invariants.

    pipe = RQPipeline.from_pretrained("weights/emoji-64")
    images = pipe("noto", prompt="red heart", num_images=4, generator=torch.Generator().manual_seed(0)).images
    images = text_pipe(prompt="red circle", num_images=4, guidance_scale=3.0).images   # a model with text
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from rqcore.checks import is_number, is_whole
from rqcore.hub_transfer import resolve_folder
from rqcore.images import to_pil
from rqcore.machine import native_bf16
from rqcore.metrics import psnr
from rqtransformer import TEXT_PAD_ID, RQTransformer
from rqtransformer.cpu_weights import check_cpu_weights, default_cpu_weights
from rqtransformer.options import check_filters
from rqtransformer.sampling import one_request
from rqvae import RQVAE

from .hub import push_to_hub
from .inputs import (batch_size, check_display_names, check_examples, check_num_images, check_options,
                     check_prompt_list, clean_prompt, label_list, prompt_list, read_options, read_prompts)
from .outputs import Reconstruction, RQPipelineOutput
from .pixels import images_to_tensor, mask_to_keep
from .streaming import decode_preview, sample_in_thread

PIPELINE_FILE = "pipeline.json"
PROMPTS_FILE = "prompts.json"  # in rqtransformer/: training captions, for example prompts (text models)
OUTPUT_TYPES = ("pil", "pt", "np")
CPU_DECODERS = ("auto", "float32", "bfloat16")  # from_pretrained(cpu_decoder=)
# from_pretrained(**EXACT_CPU): the model as saved, without the CPU's faster rounded paths (evaluation, parity)
EXACT_CPU = {"cpu_weights": "float32", "cpu_decoder": "float32"}
NO_EMPTY_PROMPT = ("this model was trained without caption dropout, so it cannot sample from the empty prompt "
                   "(no prompt): give a prompt with words in it")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RQPipeline:
    def __init__(self, rqvae: RQVAE, transformer: RQTransformer, max_images: int = 16,
                 default_guidance_scale: float = 3.0, caption_dropout: float | None = None,
                 prompts: list[str] | None = None, class_title: str = "Class", guidance: bool = True,
                 top_k: int | list[int] | None = None, top_p: float | list[float] | None = None,
                 class_display_names: dict[str, str] | None = None, examples: list[dict] | None = None):
        """caption_dropout: the rate of empty prompts the text model was trained with (None = unknown); 0 means
        the empty prompt was never seen, so sampling it (no prompt) is refused. prompts: example prompts (the
        training captions) for text models, saved as rqtransformer/prompts.json. class_title: what the classes
        are, for display (e.g. "Style"). guidance: False when the null class was never trained (converted
        official checkpoints): guidance_scale must then stay 1. top_k, top_p: the sampling filters used when a
        call gives neither (one value, or a list of one per depth as the official configs give them).
        class_display_names: {class name: display name} ("fxemoji": "Firefox OS"), shown by the app and accepted
        as class labels. examples: the app's examples ({"prompt", "class", "image"}: see inputs.check_examples)."""
        tc, vc = transformer.config, rqvae.config
        if tc.codebook_size != vc.codebook_size or tuple(tc.code_shape) != vc.code_shape:
            raise ValueError(f"the transformer expects codes {tuple(tc.code_shape)} from a codebook of "
                             f"{tc.codebook_size}, the RQ-VAE makes {vc.code_shape} from {vc.codebook_size}")
        check_options(max_images, default_guidance_scale, caption_dropout, class_title, guidance)
        check_filters(transformer, top_k, top_p)  # the sampler's own rule, so a bad pipeline.json fails at load
        prompts = check_prompt_list([] if prompts is None else prompts, "prompts")
        if prompts and not transformer.has_text:
            raise ValueError("prompts are example prompts for a text model; this model has no text conditioning")
        if transformer.has_text and transformer.tokenizer is None:
            raise ValueError("this text model has no tokenizer: set transformer.tokenizer (a PromptTokenizer)")
        self.rqvae, self.transformer = rqvae.eval(), transformer.eval()
        self.max_images, self.default_guidance_scale = int(max_images), float(default_guidance_scale)
        self.caption_dropout = None if caption_dropout is None else float(caption_dropout)
        self._prompts, self.class_title = prompts, class_title.strip()
        self.guidance, self.top_k, self.top_p = guidance, top_k, top_p
        self.class_display_names = check_display_names(class_display_names, self.class_names)
        self.examples = check_examples(examples, self.class_names if tc.num_classes else [], transformer.has_text)
        self.folder: Path | None = None  # set by from_pretrained; push_to_hub reuses its card and examples

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, cpu_weights: str = "auto", cpu_decoder: str = "auto", *,
                        revision: str | None = None, local_files_only: bool = False, cache_dir=None,
                        token: str | bool | None = None) -> "RQPipeline":
        """path: a saved pipeline folder or a Hub repo id "user/name" (at `revision`; see rqcore.hub_transfer).
        cpu_weights: on the CPU (float32 dtype), the weights the transformer samples with
        (RQTransformer.quantized_for_cpu): "float32", "float16", "int8" or "int4"; "auto" (default): the fastest
        that meets the fidelity bound on this CPU (rqtransformer.cpu_weights.default_cpu_weights), falling back
        to float32 where the CPU lacks its kernels. An explicit choice the CPU cannot run is a ValueError.
        cpu_decoder: the RQ-VAE decoder's arithmetic on the CPU, "float32" or "bfloat16" (autocast); "auto":
        bfloat16 where the CPU multiplies it natively (2-4x faster; images 39-62 dB PSNR from float32's)."""
        check_cpu_weights(cpu_weights)
        if cpu_decoder not in CPU_DECODERS:
            raise ValueError(f"cpu_decoder must be one of {', '.join(map(repr, CPU_DECODERS))}, got {cpu_decoder!r}")
        path = Path(resolve_folder(path, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir,
                                   token=token))
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise ValueError(f"pipeline folder {path} {what} (expected rqvae/ and rqtransformer/ inside)")
        for sub in ("rqvae", "rqtransformer"):
            if not (path / sub).is_dir():
                raise ValueError(f"{path} has no {sub}/ folder: not a saved RQPipeline")
        options = read_options(path / PIPELINE_FILE)
        rqvae = RQVAE.from_pretrained(path / "rqvae")
        transformer = RQTransformer.from_pretrained(path / "rqtransformer")
        # JSON only (never a pickle), checked to be a list of strings; models without text have no prompts
        prompts = read_prompts(path / "rqtransformer" / PROMPTS_FILE) if transformer.has_text else []
        try:
            pipe = cls(rqvae, transformer, prompts=prompts, **options)
        except ValueError as e:  # options of pipeline.json, or a transformer made for another RQ-VAE
            raise ValueError(f"{path}: {e}") from None
        pipe.folder = path
        pipe.to(device or default_device(), dtype)
        if pipe.device.type == "cpu" and dtype in (None, torch.float32):
            weights = default_cpu_weights(transformer) if cpu_weights == "auto" else cpu_weights
            try:  # in place: the same float32 parameters and state_dict; training uses them as is
                pipe.transformer = transformer.quantized_for_cpu(weights, inplace=True).eval()
            except ValueError:
                if cpu_weights != "auto":
                    raise  # asked for explicitly; by default the float32 model simply stays
            bf16 = cpu_decoder == "bfloat16" or (cpu_decoder == "auto" and native_bf16())
            rqvae.cpu_decode_dtype = torch.bfloat16 if bf16 else torch.float32
        return pipe

    def save_pretrained(self, path, dtype: torch.dtype | None = None) -> None:
        path = Path(path)
        self.rqvae.save_pretrained(path / "rqvae", dtype=dtype)
        self.transformer.save_pretrained(path / "rqtransformer", dtype=dtype)
        self.save_options(path)

    def save_options(self, path) -> None:
        """pipeline.json (and a text model's rqtransformer/prompts.json): save_pretrained less the weights."""
        path = Path(path)
        options = {"max_images": self.max_images, "default_guidance_scale": self.default_guidance_scale}
        if self.caption_dropout is not None:
            options["caption_dropout"] = self.caption_dropout
        if self.class_title != "Class":
            options["class_title"] = self.class_title
        if self.class_display_names:
            options["class_display_names"] = self.class_display_names
        if not self.guidance:
            options["guidance"] = False
        options.update({k: v for k, v in (("top_k", self.top_k), ("top_p", self.top_p)) if v is not None})
        if self.examples:
            options["examples"] = self.examples
        (path / PIPELINE_FILE).write_text(json.dumps(options, indent=2) + "\n")
        if self._prompts:
            (path / "rqtransformer" / PROMPTS_FILE).write_text(
                json.dumps(self._prompts, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")

    push_to_hub = push_to_hub  # (repo_id, token=None, private=False, commit_message=...): see pipelines.hub

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

    @property
    def has_text(self) -> bool:
        """Whether the model takes a prompt."""
        return self.transformer.has_text

    @property
    def prompts(self) -> list[str]:
        """Example prompts (training captions from prompts.json) of a text model; [] if none were saved."""
        return list(self._prompts)

    @prompts.setter
    def prompts(self, prompts: list[str]) -> None:
        self._prompts = check_prompt_list(prompts, "prompts")

    # ---- input checks -------------------------------------------------------------------------

    def _text_tokens(self, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Prompts -> (token ids [len(prompts), max_text_len] on the device, the prompts that were cut)."""
        L = self.transformer.config.max_text_len
        texts, cut = zip(*(clean_prompt(p, L) for p in prompts))
        ids, truncated = self.transformer.tokenizer.encode(list(texts), L)  # [P, L]
        if self.caption_dropout == 0 and (ids == TEXT_PAD_ID).all(1).any():
            raise ValueError(NO_EMPTY_PROMPT)
        long = [p for p, t, c in zip(prompts, truncated, cut) if t or c]
        return ids.to(self.device), list(dict.fromkeys(long))  # each cut prompt once, in order

    def _generate_kwargs(self, class_labels, prompt, num_images, guidance_scale, generator, output_type,
                         stacklevel: int = 4, **options) -> tuple[dict, dict]:
        """Checked user input -> (keyword arguments for transformer.generate, which checks the sampling
        `options` (temperature, top_k, top_p) and the guidance scale itself; the output's class_labels,
        prompts and truncated_prompts). stacklevel: of the truncation warning, to point at the user's call."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        check_num_images(num_images, self.max_images)
        c = self.transformer.config
        aliases = {shown: name for name, shown in self.class_display_names.items()}
        labels = label_list(class_labels, self.class_names, c.num_classes, self.max_images, aliases)
        prompts = prompt_list(prompt, self.has_text, self.max_images)
        batch = batch_size(labels, prompts, num_images)
        text, truncated = None, []
        if prompts is not None:
            text, truncated = self._text_tokens(prompts)  # [1 or B, L]: generate() prefills one prompt once
            prompts = prompts * (batch // len(prompts))
        elif self.has_text and self.caption_dropout == 0:
            raise ValueError(NO_EMPTY_PROMPT)  # no prompt = the empty prompt
        if truncated:
            n, first = len(truncated), truncated[0]
            warnings.warn(f"{n} prompt{'s' if n > 1 else ''} longer than the model's {c.max_text_len} tokens "
                          f"truncated: {first[:60]!r}{'...' if len(first) > 60 else ''}", stacklevel=stacklevel)
        if labels is not None:
            labels = labels * (batch // len(labels))
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale  # without labels or text generate() ignores it (but checks it)
        elif not self.guidance and guidance_scale != 1:
            raise ValueError(f"guidance is off for this model: its unconditional (null) class was never trained "
                             f"(a converted official checkpoint), so guidance_scale must be 1, got {guidance_scale!r}; "
                             "fine-tune it with --cfg_dropout to train one")
        if options.get("top_k") is None and options.get("top_p") is None:  # neither given: the model's defaults
            options.update(top_k=self.top_k, top_p=self.top_p)
        tensor = None if labels is None else torch.tensor(labels, dtype=torch.long, device=self.device)
        kwargs = dict(class_labels=tensor, text_tokens=text, num_samples=batch, guidance_scale=guidance_scale,
                      generator=generator, **options)
        return kwargs, dict(class_labels=labels, prompts=prompts, truncated_prompts=truncated)

    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s), uint8 arrays [H,W,C] or float tensors [B,3,H,W] in [-1,1] -> [B,3,R,R] in [-1,1].

        Any size is accepted: images are resized (shorter side) and center-cropped to the model's
        resolution; any PIL mode is converted to RGB (transparency on white)."""
        return images_to_tensor(images, self.resolution).to(self.device)

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
    def __call__(self, class_labels=None, prompt: str | list[str] | None = None, num_images: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 output_type: str = "pil") -> RQPipelineOutput:
        """Sample images of `class_labels` (a class name or index, or a list of them: one image each) and/or
        `prompt` (text models: a string, or a list of them: one image each; None = the empty prompt).
        num_images repeats a single label/prompt (None: once), or sets the count without either.
        guidance_scale None = the pipeline's default, 1 = off. top_k and top_p both None: the pipeline's
        defaults (pipeline.json; the official settings in a converted folder), else none. Prompts longer than
        the model's max_text_len tokens are cut: the output lists them in truncated_prompts, and a warning says so."""
        kwargs, meta = self._generate_kwargs(class_labels, prompt, num_images, guidance_scale, generator,
                                             output_type, temperature=temperature, top_k=top_k, top_p=top_p)
        *_, final = self._sample(kwargs, meta, output_type)
        return final

    def stream(self, class_labels=None, prompt: str | list[str] | None = None, num_images: int | None = None,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               guidance_scale: float | None = None, generator: torch.Generator | None = None,
               output_type: str = "pil", every: int | None = None, latest_only: bool = False,
               min_interval: float = 0.0):
        """Like __call__, but yields a preview after every `every` positions (default: every code row):
        sampled positions decoded, the rest grey. The last item is the final output (done == 1).
        Closing the stream early stops the sampling.

        latest_only=True (what the app uses): sampling never waits for the consumer. Each preview shows
        the newest rows, previews the consumer was too busy to take are skipped, and the final output
        comes as soon as sampling ends. A slow consumer then sees fewer previews, not a slower answer.
        min_interval: at least this many seconds between previews (the first is never held back); the
        ones due sooner are skipped before decoding. The app uses 0.15 s: on 2 cores every preview
        decoded and sent slows the sampling thread down."""
        kwargs, meta = self._generate_kwargs(class_labels, prompt, num_images, guidance_scale, generator,
                                             output_type, 3, temperature=temperature, top_k=top_k, top_p=top_p)
        w = self.rqvae.code_shape[1]
        if every is not None and not (is_whole(every) and every >= 1):
            raise ValueError(f"every must be a positive whole number of positions (None: every code row, {w}), "
                             f"got {every!r}")
        if not isinstance(latest_only, bool):
            raise ValueError(f"latest_only must be True or False, got {latest_only!r}")
        if not (is_number(min_interval) and 0 <= min_interval < float("inf")):
            raise ValueError(f"min_interval must be a number of seconds >= 0, got {min_interval!r}")
        yield from self._sample(kwargs, meta, output_type, every=int(every or w), latest_only=latest_only,
                                min_interval=float(min_interval))

    def _sample(self, kwargs: dict, meta: dict, output_type: str, every: int | None = None,
                latest_only: bool = False, min_interval: float = 0.0):
        """generate(**kwargs), decoded; with `every`, previews first (sampling then runs in a thread).
        meta: the outputs' class_labels, prompts and truncated_prompts."""
        if every is None:
            codes = self.transformer.generate(**kwargs)
        else:
            h, w, _ = self.rqvae.code_shape
            for step, partial in sample_in_thread(self.transformer.generate, kwargs, every, h * w, latest_only,
                                                  min_interval):
                if step is None:
                    codes = partial
                    break
                yield self._preview(partial, step, meta, output_type)
        yield self.decode_output(codes, meta, output_type)

    @torch.inference_mode()
    def decode_output(self, codes: torch.Tensor, meta: dict, output_type: str = "pil") -> RQPipelineOutput:
        """Sampled codes [B,h,w,D] -> the output (images decoded; meta: class_labels, prompts, truncated_prompts)."""
        return RQPipelineOutput(self._as_output_type(self.rqvae.decode(codes), output_type), codes.cpu(), **meta)

    def request(self, class_labels=None, prompt: str | list[str] | None = None, num_images: int | None = None,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                guidance_scale: float | None = None, generator: torch.Generator | None = None,
                output_type: str = "pil") -> tuple:
        """__call__'s input, checked -> (conditioning, SamplingOptions, generator, meta) of one request, for a
        batch of several (pipelines.batching; rqtransformer.generate)."""
        kwargs, meta = self._generate_kwargs(class_labels, prompt, num_images, guidance_scale, generator,
                                             output_type, temperature=temperature, top_k=top_k, top_p=top_p)
        rows, options = one_request(self.transformer, kwargs["class_labels"], kwargs["text_tokens"],
                                    kwargs["num_samples"], temperature=kwargs["temperature"], top_k=kwargs["top_k"],
                                    top_p=kwargs["top_p"], guidance_scale=kwargs["guidance_scale"])
        return rows, options, generator, meta

    @torch.inference_mode()
    def _preview(self, codes: torch.Tensor, step: int, meta: dict, output_type,
                 images: torch.Tensor | None = None) -> RQPipelineOutput:
        """Decode the sampled positions (unless `images` holds them decoded); positions not sampled yet are grey."""
        h, w, _ = self.rqvae.code_shape
        images = decode_preview(self.rqvae, codes) if images is None else images
        return RQPipelineOutput(self._as_output_type(images, output_type), codes.cpu(), **meta, done=step / (h * w))

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
        return mask_to_keep(mask, self.resolution, self.rqvae.config.downsample)

    @torch.inference_mode()
    def complete(self, image, mask, class_labels=None, prompt: str | list[str] | None = None,
                 num_images: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil") -> RQPipelineOutput:
        """Regenerate the code positions under the white (painted) part of `mask`, keeping the others' codes.

        Checks the image, then the mask, then the rest (as __call__). The output also holds `keep_mask`
        [h,w] (True = kept) and `input_image` (the input as the model saw it), e.g. to show the regenerated cells."""
        x = self._one_image(image, "complete")  # [1,3,R,R]
        keep = self.mask_to_keep(mask).to(self.device)  # [h,w]
        kwargs, meta = self._generate_kwargs(class_labels, prompt, num_images, guidance_scale, generator,
                                             output_type, temperature=temperature, top_k=top_k, top_p=top_p)
        codes = self.rqvae.encode(x)  # [1,h,w,D]
        *_, final = self._sample({**kwargs, "prefix": (codes, keep[None])}, meta, output_type)
        final.keep_mask, final.input_image = keep.cpu(), to_pil(x)[0]
        return final

"""Gradio app over an RQPipeline: generate (with streamed coarse-to-fine previews), reconstruct per
depth, complete a masked region. Runs unchanged as a Hugging Face Space.

    python app.py [--weights DIR]        # or RQ_WEIGHTS=DIR; DIR may be a Hub repo id user/name, or
                                         # official:NAME, a paper release (python -m official.fetch_official);
                                         # host/port: GRADIO_SERVER_NAME/_PORT

API (gradio_client; every input but the image has a default):
    client.predict(api_name="/generate")                          # class_name, num_images, seed, ..., prompt
    client.predict(prompt="red circle", api_name="/generate")     # models with text ("" = no prompt)
    client.predict(handle_file("a.png"), api_name="/reconstruct")
    client.predict({"background": handle_file("a.png"), "layers": [handle_file("mask.png")], "composite": None},
                   api_name="/complete")                          # mask: white (or painted) = regenerate
class_name: a class name, or "Random <class title>" (e.g. "Random style"; "Random class" works everywhere).
"""
from __future__ import annotations

import difflib
import hashlib
import os
import random
import sys
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import torch

from app_io import (MAX_SEED, RANDOM_CLASS, check_seed, check_whole, code_map, editor_mask, named_errors,
                    parse_app_args, pick_labels, pick_prompt, resolve_weights, sampling_filters, shade_regenerated,
                    upscale, user_errors, warn_truncated)
from pipelines import RQPipeline
from pipelines.batching import MAX_ROWS, Batcher
from pipelines.hub import model_card
from rqcore.cards import CARD_NAME, PAPER, card_summary, card_text

try:  # ZeroGPU on Hugging Face Spaces; a no-op everywhere else
    import spaces
    gpu = spaces.GPU
except ImportError:
    def gpu(fn):
        return fn


@gpu
def run_on_gpu(fn):
    """The batcher's runner: one (ZeroGPU) GPU call per batch, or per reconstruction or completion."""
    return fn()


HERE = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = HERE / "weights" / "emoji-64"
PREVIEW_INTERVAL = 0.15  # seconds between streamed previews (see Endpoints.generate)
GENERATE_CONCURRENCY = 16  # generate requests handed to the batcher at once (the rest wait in Gradio's queue)
CACHE_ROOT = Path(os.environ.get("GRADIO_EXAMPLES_CACHE", ".gradio/cached_examples"))
# captions-below: gradio's Gallery lays captions over the images (hiding their lower edge) and has no option for it
CSS = """.pixelated img {image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain}
.captions-below button.thumbnail-item {aspect-ratio: auto; height: auto; display: flex; flex-direction: column}
.captions-below .thumbnail-item.thumbnail-lg > img {aspect-ratio: 1; height: auto; min-height: 0}
.captions-below .thumbnail-item .caption-label {position: static; max-width: none; white-space: normal; border: 0}"""
LAUNCH_KWARGS = dict(theme=gr.themes.Soft(), css=CSS, show_error=True)  # Gradio 6: theme/css go to launch()


def pretty(name: str | None) -> str:
    """Class folder name -> label: "smileys_and_emotion" -> "Smileys & emotion"."""
    return (name or "").replace("_and_", " & ").replace("_", " ").strip().capitalize() or (name or "")


def class_label(pipe: RQPipeline, name: str) -> str:
    """What the app calls a class: its display name from pipeline.json, else its name prettified."""
    return pipe.class_display_names.get(name) or pretty(name)


def captions(pipe: RQPipeline, out) -> list[str]:
    """The prompt and the class of each image of a pipeline output, for display."""
    n = len(out.images)
    prompts = [p if len(p) <= 80 else p[:79] + "…" for p in out.prompts or [""] * n]
    classes = [class_label(pipe, pipe.class_names[i]) for i in out.class_labels] if out.class_labels else [""] * n
    return [" · ".join(filter(None, (p.strip(), c))) for p, c in zip(prompts, classes)]


def model_facts(pipe: RQPipeline) -> str:
    """What this running model is, for the About tab: sizes, device, classes, prompts."""
    h, w, D = pipe.rqvae.code_shape
    params = sum(p.numel() for m in (pipe.rqvae, pipe.transformer) for p in m.parameters())
    c, names = pipe.transformer.config, pipe.class_names  # ImageNet's 1,000: the first few
    return (f"### This model\n{pipe.resolution} px images as {h}×{w}×{D} codes from a codebook of "
            f"{c.codebook_size}; {params / 1e6:.1f} M parameters; running on `{pipe.device}`. "
            f"{pipe.class_title} choices: {', '.join(class_label(pipe, n) for n in names[:24]) or 'none'}"
            f"{f' ... ({len(names):,} in all)' if len(names) > 24 else ''}. "
            f"Prompts: {f'up to {c.max_text_len} tokens' if pipe.has_text else 'none (no text conditioning)'}.")


def about_texts(pipe: RQPipeline, weights: Path | None) -> tuple[str, str]:
    """(summary, full card) for the About tab: the folder's model card, else one written from the pipeline."""
    has_card = weights is not None and (weights / CARD_NAME).is_file()
    card = (weights / CARD_NAME).read_text(encoding="utf-8") if has_card else model_card(pipe)
    method = "" if PAPER in card else f"\n\n### Method\n{PAPER}."
    return f"{card_summary(card)}\n\n{model_facts(pipe)}{method}", card_text(card)


@contextmanager
def examples_cache(weights: Path | None):
    """Cache examples per weights version (gradio reads GRADIO_EXAMPLES_CACHE while the Examples are
    built), so retrained weights never show stale cached outputs."""
    folder = CACHE_ROOT
    if weights is not None:
        stamp = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(weights.rglob("*.safetensors"))]
        folder /= f"{weights.name}-{hashlib.sha1(str([str(weights.resolve()), stamp]).encode()).hexdigest()[:10]}"
    old, os.environ["GRADIO_EXAMPLES_CACHE"] = os.environ.get("GRADIO_EXAMPLES_CACHE"), str(folder)
    try:
        yield
    finally:
        os.environ.pop("GRADIO_EXAMPLES_CACHE") if old is None else os.environ.update(GRADIO_EXAMPLES_CACHE=old)


class ClassChoice:
    """The class dropdowns: "Random <title>" first, then the classes by label. Over the API the value is
    checked here, so that the message names this model's choices."""

    def __init__(self, pipe: RQPipeline):
        self.names, self.title = pipe.class_names, pipe.class_title
        self.random = f"Random {self.title.lower()}"
        by_label = sorted(((class_label(pipe, n), n) for n in self.names), key=lambda c: c[0].casefold())
        self.choices = [(self.random, self.random)] + by_label  # in the order of what the user reads

    def dropdown(self) -> gr.Dropdown:
        box = gr.Dropdown(self.choices, value=self.random, label=self.title, visible=bool(self.names))
        box.preprocess = self.check
        return box

    def check(self, value):
        if value in (None, "", RANDOM_CLASS, self.random) or value in self.names:
            return value
        close = difflib.get_close_matches(str(value), self.names, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        shown = ", ".join(map(repr, [self.random] + self.names[:20]))
        more = f" ... ({len(self.names):,} classes in all)" if len(self.names) > 20 else ""
        raise gr.Error(f"Value: {value} is not in the list of choices; {hint}choose one of {shown}{more}")

    def pick(self, choice, num_images: int, seed: int):
        return pick_labels(self.names, choice, num_images, seed, self.random)


class Endpoints:
    """One pipeline's three API endpoints (generate, reconstruct, complete) and the examples the tabs show."""

    def __init__(self, pipe: RQPipeline, weights: Path | None, max_rows: int = MAX_ROWS):
        self.pipe, self.weights, self.classes = pipe, weights, ClassChoice(pipe)
        self.images = min(4, pipe.max_images)  # the default number of images
        self.example_images = sorted(weights.glob("examples/*.png"))[:6] if weights else []
        # every use of the model goes through one worker: concurrent requests are sampled as one batch, and on
        # ZeroGPU one GPU call serves one batch
        self.batcher = Batcher(pipe, max_rows=max_rows, run=run_on_gpu)

    def generate(self, class_name=RANDOM_CLASS, num_images=4, seed=0, temperature=1.0, top_k=0, top_p=1.0,
                 guidance_scale=None, prompt="", progress=gr.Progress()):
        pipe = self.pipe
        seed = check_seed(seed)
        num_images = check_whole(num_images, "Number of images", 1, pipe.max_images)
        top_k = check_whole(top_k, "Top-k (0 = off)", 0, pipe.transformer.config.codebook_size)
        labels = self.classes.pick(class_name, num_images, seed)
        generator = torch.Generator(pipe.device).manual_seed(seed)
        progress(0, desc="Sampling")
        with user_errors():
            # latest_only: previews never hold sampling back; min_interval: fewer previews to decode and send
            for i, out in enumerate(self.batcher.stream(labels, pick_prompt(prompt), num_images, temperature,
                                                        generator=generator, guidance_scale=guidance_scale,
                                                        min_interval=PREVIEW_INTERVAL,
                                                        **sampling_filters(top_k, top_p))):
                if i == 0:
                    warn_truncated(pipe, out)
                progress(out.done, desc="Sampling" if out.done < 1 else "Done")
                yield list(zip(map(upscale, out.images), captions(pipe, out)))

    def generate_final(self, class_name, num_images, seed, prompt=""):
        """The last of generate's images, for the cached examples."""
        *_, last = self.generate(class_name, num_images, seed, prompt=prompt)
        return last

    @torch.inference_mode()
    def reconstruct(self, image):
        if image is None:
            raise gr.Error("upload an image (or pick an example) to reconstruct")
        with user_errors():
            image.load()
            rec = self.batcher.run_alone(lambda: self.pipe.reconstruct(image))
        strip = [(upscale(rec.input_image), "input (resized)")]
        strip += [(upscale(im), f"depth {k}: {p:.1f} dB") for k, (im, p) in enumerate(zip(rec.images, rec.psnr), 1)]
        return strip, code_map(rec.codes)

    @torch.inference_mode()
    def complete(self, image, class_name=RANDOM_CLASS, num_images=4, seed=0, use_box=False, x0=0.25, y0=0.25,
                 x1=0.75, y1=0.75, prompt=""):
        """image: the editor value {"background": image, "layers": [mask images], "composite": ...}."""
        seed = check_seed(seed)
        num_images = check_whole(num_images, "Number of images", 1, self.pipe.max_images)
        if not image or image.get("background") is None:
            raise gr.Error("upload an image to complete")
        background = image["background"]
        labels = self.classes.pick(class_name, num_images, seed)
        with user_errors():
            background.load()
            mask = editor_mask(image, (x0, y0, x1, y1) if use_box else None)
            generator = torch.Generator(self.pipe.device).manual_seed(seed)
            out = self.batcher.run_alone(lambda: self.pipe.complete(background, mask, labels, pick_prompt(prompt),
                                                                    num_images=num_images, generator=generator))
        warn_truncated(self.pipe, out)
        shown = shade_regenerated(out.input_image, out.keep_mask)
        return [(shown, "shaded = regenerated")] + list(zip(map(upscale, out.images), captions(self.pipe, out)))

    def generate_examples(self) -> list[list]:
        """Rows of (class, number, seed[, prompt]) for the Generate tab."""
        pipe, n, names = self.pipe, self.images, self.pipe.class_names
        if pipe.examples:  # pipeline.json's examples: (prompt, class) pairs the evaluation scored well
            return [[e.get("class", self.classes.random), n, i] + ([e["prompt"]] if pipe.has_text else [])
                    for i, e in enumerate(pipe.examples[:6])]
        if pipe.has_text:  # the first prompts of prompts.json (a spread); "" only where the model allows it
            prompts = pipe.prompts[:5] or ([""] if pipe.caption_dropout != 0 else [])
            return [[names[i % len(names)] if names else self.classes.random, n, i, p] for i, p in enumerate(prompts)]
        return [[self.classes.random, n, 0]] + [[c, n, 1] for c in names[:3]]

    def complete_examples(self) -> list[list]:
        """Rows of the Complete tab's inputs, the bottom half boxed: pipeline.json's pictured examples, each
        with its own class and prompt, else the folder's example images."""
        pipe, weights, n, box = self.pipe, self.weights, self.images, [True, 0.0, 0.5, 1.0, 1.0]
        pictured = [e for e in pipe.examples if weights and e.get("image") and (weights / e["image"]).is_file()]
        if pictured:
            return [[str(weights / e["image"]), e.get("class", self.classes.random), n, 0, *box]
                    + ([e["prompt"]] if pipe.has_text else []) for e in pictured[:3]]
        prompts = pipe.prompts[:5] or ([""] if pipe.caption_dropout != 0 else [])
        tails = [[p] for p in prompts] if pipe.has_text else [[]]  # the prompt column of text models
        return [[str(p), self.classes.random, n, 0, *box] + tails[i % len(tails)]
                for i, p in enumerate(self.example_images[:3] if tails else [])]


def clear_on_failure(event, outputs: list) -> None:
    """A failed call empties its outputs, so that an error never sits beside an earlier result."""
    event.failure(lambda: {o: None for o in outputs}, None, outputs, api_visibility="private", queue=False)


def prompt_box(pipe: RQPipeline) -> gr.Textbox:
    """The prompt textbox and its random-prompt button (shown for models with text only)."""
    prompts = pipe.prompts
    with gr.Row(equal_height=True, visible=pipe.has_text):
        box = gr.Textbox("", label="Prompt", placeholder=f"e.g. {prompts[0]}" if prompts else "describe the image",
                         max_lines=3, scale=4, visible=pipe.has_text)
        dice = gr.Button("🎲 Random prompt", scale=1, min_width=90, visible=bool(prompts))
    dice.click(lambda: random.choice(prompts or [""]), None, box, api_visibility="private", queue=False)
    return box


def generate_tab(ep: Endpoints) -> None:
    pipe = ep.pipe
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            prompt = prompt_box(pipe)
            cls = ep.classes.dropdown()
            num = gr.Slider(1, pipe.max_images, value=ep.images, step=1, label="Number of images")
            with gr.Row(equal_height=True):
                seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", scale=4)
                dice = gr.Button("🎲 Random", scale=1, min_width=90)
            with gr.Accordion("Sampling", open=False):
                temp = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
                # 0 / 1 leave the model's own filters (pipeline.json) in force, where it has any
                unset = "the model's" if pipe.top_k is not None or pipe.top_p is not None else "off"
                top_k = gr.Slider(0, pipe.transformer.config.codebook_size, value=0, step=1,
                                  label=f"Top-k (0 = {unset})")
                top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label=f"Top-p (1 = {unset})")
                # hidden where the null class was never trained (converted official models): always 1
                cfg = gr.Slider(0.0, max(10.0, pipe.default_guidance_scale), step=0.1, visible=pipe.guidance,
                                value=pipe.default_guidance_scale, label="Guidance scale (1 = off)")
            go = gr.Button("Generate", variant="primary")
        gallery = gr.Gallery(label="Samples", elem_id="samples", columns=4, height=440, format="png",
                             object_fit="contain", buttons=["download", "download_all", "fullscreen"], scale=2,
                             elem_classes="captions-below")
    dice.click(lambda: random.randint(0, 2**31 - 1), None, seed, api_visibility="private", queue=False)
    # prompt last: positional API calls that pass no prompt keep their meaning
    clear_on_failure(go.click(ep.generate, [cls, num, seed, temp, top_k, top_p, cfg, prompt], gallery,
                              api_name="generate", concurrency_id="generate",
                              concurrency_limit=GENERATE_CONCURRENCY), [gallery])
    rows = ep.generate_examples()
    if rows:
        gr.Examples(rows, [cls, num, seed, prompt][:len(rows[0])], gallery, ep.generate_final,
                    cache_examples=True, cache_mode="lazy", label="Examples (cached after first use)")


def reconstruct_tab(ep: Endpoints) -> None:
    h, w, D = ep.pipe.rqvae.code_shape
    gr.Markdown(f"Encode an image into its {h}×{w}×{D} code stack and decode it using only the first "
                f"1..{D} codes per cell: PSNR (dB, higher is closer) grows with every depth.")
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            image = gr.Image(type="pil", image_mode=None, label="Image", sources=["upload", "clipboard"],
                             height=300, elem_classes="pixelated")
            button = gr.Button("Reconstruct", variant="primary")
        with gr.Column(scale=2):
            strip = gr.Gallery(label="Reconstruction by depth", columns=D + 1, rows=1, height=260,
                               format="png", object_fit="contain", elem_classes="captions-below")
            gr.Markdown(f"**Code grid** below: each cell is one of the {h}×{w} code positions; its colour and "
                        "number are the code index chosen at depth 1 (same colour = same code).")
            heat = gr.Image(label="Code grid (depth 1)", format="png", height=320, interactive=False)
    clear_on_failure(gr.on([button.click, image.upload], ep.reconstruct, image, [strip, heat],
                           api_name="reconstruct", concurrency_id="model"), [strip, heat])
    if ep.example_images:
        gr.Examples([[str(p)] for p in ep.example_images], image, [strip, heat], ep.reconstruct,
                    cache_examples=True, cache_mode="lazy")


def complete_tab(ep: Endpoints) -> None:
    pipe = ep.pipe
    gr.Markdown("Paint over the part to regenerate (or use a box); the other code positions are kept and "
                "the transformer fills in the painted ones.")
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            brush = gr.Brush(default_size=max(1, pipe.resolution // 16), colors=[("#ff00ff", 0.7)],
                             color_mode="fixed")  # radius in image pixels; any painted pixel counts
            editor = gr.ImageEditor(type="pil", image_mode="RGBA", label="Image", brush=brush, layers=False,
                                    sources=["upload", "clipboard"], transforms=(), height=360)
            prompt = prompt_box(pipe)
            cls = ep.classes.dropdown()
            num = gr.Slider(1, pipe.max_images, value=ep.images, step=1, label="Number of images")
            seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
            with gr.Accordion("Box mask (instead of painting)", open=False):
                use_box = gr.Checkbox(False, label="Use a box mask (fractions of the image)")
                box = [gr.Slider(0, 1, value=v, step=0.05, label=n) for n, v in
                       zip(["x0 (left)", "y0 (top)", "x1 (right)", "y1 (bottom)"], [0.25, 0.25, 0.75, 0.75])]
            button = gr.Button("Complete", variant="primary")
        completed = gr.Gallery(label="Completions", columns=3, height=620, format="png", scale=2,
                               elem_classes="captions-below")
    inputs = [editor, cls, num, seed, use_box, *box, prompt]
    clear_on_failure(button.click(ep.complete, inputs, completed, api_name="complete", concurrency_id="model"),
                     [completed])
    rows = ep.complete_examples()
    if rows:
        gr.Examples(rows, inputs[:len(rows[0])], completed, ep.complete, cache_examples=True,
                    cache_mode="lazy", label="Examples (bottom half regenerated)")


def about_tab(ep: Endpoints) -> None:
    summary, card = about_texts(ep.pipe, ep.weights)
    gr.Markdown(summary)
    with gr.Accordion("Full model card", open=False):
        gr.Markdown(card)


def build_demo(pipe_or_path, max_rows: int = MAX_ROWS, cpu_weights: str = "auto",
               cpu_decoder: str = "auto") -> gr.Blocks:
    """A Blocks app around an RQPipeline, a saved pipeline folder or a Hub repo id (ValueError if it can't be
    loaded). max_rows: transformer rows per batch of concurrent requests (pipelines.batching); cpu_weights,
    cpu_decoder: the precision of a loaded pipeline on a CPU (RQPipeline.from_pretrained)."""
    pipe = pipe_or_path if isinstance(pipe_or_path, RQPipeline) else \
        RQPipeline.from_pretrained(pipe_or_path, cpu_weights=cpu_weights, cpu_decoder=cpu_decoder)
    weights = None if pipe is pipe_or_path else pipe.folder  # for a Hub repo id: its snapshot in the Hub cache
    endpoints = Endpoints(pipe, weights, max_rows)
    h, w, D = pipe.rqvae.code_shape
    with examples_cache(weights), gr.Blocks(title="RQ image generator", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# RQ-VAE + RQ-Transformer\nEach {pipe.resolution} px image is a stack of {h}×{w}×{D} codes: "
                    "code 1 of every cell sketches it, each further code refines the residual. The transformer "
                    "writes the cells row by row, so you watch the image appear.")
        for name, tab in (("Generate", generate_tab), ("Reconstruct", reconstruct_tab), ("Complete", complete_tab),
                          ("About", about_tab)):
            with gr.Tab(name):
                tab(endpoints)
    for block in demo.blocks.values():
        if isinstance(block, (gr.Dropdown, gr.Slider, gr.Number, gr.Image, gr.ImageEditor)):
            named_errors(block)
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def error_demo(message: str) -> gr.Blocks:
    """Shown instead of the app when the weights can't be loaded (so a Space says why)."""
    with gr.Blocks(title="RQ image generator") as demo:
        gr.Markdown(f"# RQ image generator\n**The model could not be loaded:** {message}\n\nTrain one (see README) "
                    "or point the app at a saved pipeline with `--weights DIR` or `RQ_WEIGHTS=DIR`.")
    return demo


def main(argv=None) -> None:
    args = parse_app_args(argv, __doc__.split("\n\n")[0], DEFAULT_WEIGHTS)
    try:
        ui = build_demo(resolve_weights(args.weights), args.max_rows, args.cpu_weights, args.cpu_decoder)
    except Exception as e:  # noqa: BLE001 - missing or invalid weights: one line, no traceback
        if not os.environ.get("SPACE_ID"):
            print(f"app.py: cannot load weights from {args.weights}: {e}", file=sys.stderr)
            sys.exit(2)
        ui = error_demo(str(e))  # on a Space, show the reason in the page
    ui.launch(**LAUNCH_KWARGS)


if __name__ == "__main__":
    main()

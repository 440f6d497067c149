"""Gradio app over an RQPipeline: generate (with streamed coarse-to-fine previews), reconstruct per
depth, complete a masked region. Runs unchanged as a Hugging Face Space.

    python app.py [--weights DIR]        # or RQ_WEIGHTS=DIR; DIR may be a Hub repo id user/name;
                                         # host/port: GRADIO_SERVER_NAME/_PORT

API (gradio_client; every input but the image has a default):
    client.predict(api_name="/generate")                          # class_name, num_images, seed, ..., prompt
    client.predict(prompt="red circle", api_name="/generate")     # models with text ("" = no prompt)
    client.predict(handle_file("a.png"), api_name="/reconstruct")
    client.predict({"background": handle_file("a.png"), "layers": [handle_file("mask.png")], "composite": None},
                   api_name="/complete")                          # mask: white (or painted) = regenerate
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipelines import RQPipeline
from rqcore.images import MAX_IMAGE_PIXELS

try:  # ZeroGPU on Hugging Face Spaces; a no-op everywhere else
    import spaces
    gpu = spaces.GPU
except ImportError:
    def gpu(fn):
        return fn

HERE = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = HERE / "weights" / "emoji-64"
RANDOM_CLASS = "Random class"
MAX_SEED = 2**63 - 1
DISPLAY = 256  # outputs are upscaled (nearest neighbour) to about this many pixels
PREVIEW_INTERVAL = 0.15  # seconds between streamed previews (see generate)
CACHE_ROOT = Path(os.environ.get("GRADIO_EXAMPLES_CACHE", ".gradio/cached_examples"))
CSS = ".pixelated img {image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain}"
LAUNCH_KWARGS = dict(theme=gr.themes.Soft(), css=CSS, show_error=True)  # Gradio 6: theme/css go to launch()
# the data and its licences are the model card's (weights/<model>/README.md), shown above this
METHOD = """### Method
Lee et al., *Autoregressive Image Generation using Residual Quantization*, CVPR 2022."""


def pretty(name: str | None) -> str:
    """Class folder name -> label: "smileys_and_emotion" -> "Smileys & emotion"."""
    return (name or "").replace("_and_", " & ").replace("_", " ").strip().capitalize() or (name or "")


def class_label(pipe: RQPipeline, name: str) -> str:
    """What the app calls a class: its display name from pipeline.json, else its name prettified."""
    return pipe.class_display_names.get(name) or pretty(name)


def named_errors(component: gr.components.Component) -> None:
    """Make `component`'s input errors start with its label, and turn unreadable uploads into a clear
    gr.Error instead of a traceback. (Wraps the instance's preprocess: a Component subclass would make
    gradio write an app.pyi stub next to this file.)"""
    preprocess = component.preprocess
    is_image = isinstance(component, (gr.Image, gr.ImageEditor))

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error as e:
            raise gr.Error(f"{component.label}: {e.message}") from None
        except Image.DecompressionBombError as e:  # PIL refuses > 2x its limit before decoding
            size = re.search(r"\((\d+) pixels\)", str(e))
            size = f" ({int(size[1]):,} pixels)" if size else ""
            raise gr.Error(f"{component.label}: the image is too large{size}; the limit is {MAX_IMAGE_PIXELS:,} "
                           "pixels") from None
        except Exception as e:  # noqa: BLE001 - a non-number for a slider (API calls), or an unreadable upload
            if not is_image:
                lo, hi = getattr(component, "minimum", None), getattr(component, "maximum", None)
                wanted = f"a number from {lo} to {hi}" if lo is not None and hi is not None else "a valid value"
                raise gr.Error(f"{component.label}: expected {wanted}, got {payload!r}") from None
            reason = type(e).__name__ if "/" in str(e) else str(e)  # don't show server paths
            raise gr.Error(f"{component.label}: could not read the uploaded image ({reason}); "
                           "upload a PNG, JPEG or WebP file") from None
    component.preprocess = checked


@contextmanager
def user_errors():
    """The pipeline's ValueErrors and PIL's errors on bad uploads -> gr.Error (a message, no traceback)."""
    try:
        yield
    except gr.Error:
        raise
    except Image.DecompressionBombError as e:
        raise gr.Error(f"the image is too large: {e}") from None
    except ValueError as e:
        raise gr.Error(str(e)) from None
    except (OSError, SyntaxError) as e:
        raise gr.Error(f"could not read the image: {e}") from None


def upscale(image: Image.Image, size: int = DISPLAY) -> Image.Image:
    f = max(1, size // max(image.size))
    return image.resize((image.width * f, image.height * f), Image.NEAREST)


def check_seed(seed) -> int:
    try:
        if seed == int(seed) and 0 <= int(seed) <= MAX_SEED:
            return int(seed)
    except (TypeError, ValueError, OverflowError):
        pass
    raise gr.Error(f"Seed: must be a whole number from 0 to {MAX_SEED}, got {seed!r}")


def check_whole(value, label: str, lo: int, hi: int) -> int:
    """Sliders that need whole numbers (gradio checks only their range): 2.5 images is an error, not 2."""
    if value != int(value):
        raise gr.Error(f"{label}: must be a whole number from {lo} to {hi}, got {value!r}")
    return int(value)


def pick_labels(class_names: list[str], choice: str | None, num_images: int, seed: int) -> str | list[str] | None:
    """The dropdown value -> class_labels for the pipeline, which checks them: "Random class" draws one
    name per image from the seed (None for an unconditional model); any other value is passed on."""
    if choice not in (None, "", RANDOM_CLASS):
        return choice  # the pipeline repeats it num_images times
    if not class_names:
        return None
    rng = random.Random(seed)
    return [rng.choice(class_names) for _ in range(num_images)]


def pick_prompt(prompt: str | None) -> str | None:
    """The prompt box -> the pipeline's prompt: blank = None (no prompt), which the pipeline accepts or
    refuses depending on the model; anything else is passed on as typed."""
    return prompt if prompt and prompt.strip() else None


def captions(pipe: RQPipeline, out) -> list[str]:
    """The prompt and the class of each image of a pipeline output, for display."""
    n = len(out.images)
    prompts = [p if len(p) <= 80 else p[:79] + "…" for p in out.prompts or [""] * n]
    classes = [class_label(pipe, pipe.class_names[i]) for i in out.class_labels] if out.class_labels else [""] * n
    return [" · ".join(filter(None, (p.strip(), c))) for p, c in zip(prompts, classes)]


def warn_truncated(pipe: RQPipeline, out) -> None:
    """A prompt longer than the model reads was cut: say so (a notice, not an error)."""
    if out.truncated_prompts:
        gr.Warning(f"Prompt too long: the model reads its first {pipe.transformer.config.max_text_len} tokens "
                   "only; the rest was ignored")


def sampling_filters(top_k, top_p) -> dict:
    """The sliders' "off" values (top-k 0, top-p 1) -> None, as the pipeline takes them."""
    return dict(top_k=int(top_k) if top_k else None, top_p=float(top_p) if top_p < 1 else None)


def code_map(codes: torch.Tensor, size: int = 320) -> Image.Image:
    """Depth-1 codes [h,w,D] -> a colour grid (about `size` px), the code index written in each cell."""
    grid = codes[..., 0].numpy()  # [h,w]
    cell = max(32, size // max(grid.shape))
    hue = (grid * 0.618034) % 1.0  # golden-ratio hues: nearby indices get distinct colours
    hsv = np.stack([hue * 255, np.full_like(hue, 110), np.full_like(hue, 245)], -1).astype(np.uint8)
    h, w = grid.shape
    img = Image.fromarray(hsv, "HSV").convert("RGB").resize((w * cell, h * cell), Image.NEAREST)
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=cell // 3)
    for (i, j), c in np.ndenumerate(grid):
        x0, y0, x1, y1 = draw.textbbox((0, 0), str(c), font=font)
        draw.text(((j + 0.5) * cell - (x1 + x0) / 2, (i + 0.5) * cell - (y1 + y0) / 2), str(c), fill="black",
                  font=font)
    for k in range(1, max(h, w)):  # thin grid lines
        draw.line([(k * cell, 0), (k * cell, h * cell)], fill="white")
        draw.line([(0, k * cell), (w * cell, k * cell)], fill="white")
    return img


def editor_mask(editor: dict, box) -> Image.Image:
    """Painted strokes (any layer) and/or the box (fractions x0,y0,x1,y1) -> L mask, 255 = regenerate."""
    image = editor["background"]
    mask = np.zeros((image.height, image.width), bool)
    for layer in editor.get("layers") or []:
        layer = layer.convert("RGBA").resize(image.size, Image.NEAREST)
        alpha, grey = np.asarray(layer.getchannel("A")), np.asarray(layer.convert("L"))
        # transparent layer: painted = opaque pixels; an opaque mask image: white = regenerate
        mask |= alpha > 32 if alpha.min() < 255 else grey > 127
    if box is not None:
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise gr.Error(f"Box: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box}")
        rows = slice(round(y0 * image.height), round(y1 * image.height))
        cols = slice(round(x0 * image.width), round(x1 * image.width))
        if rows.start == rows.stop or cols.start == cols.stop:
            raise gr.Error(f"Box: covers no pixel of this {image.width}x{image.height} image; make it larger")
        mask[rows, cols] = 1
    if not mask.any():
        raise gr.Error("the mask is empty: paint over the region to regenerate, or tick 'Use a box mask'")
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


def model_card(weights: Path | None, pipe: RQPipeline) -> str:
    text = ""
    if weights is not None and (weights / "README.md").is_file():
        text = re.sub(r"\A---\n.*?\n---\n", "", (weights / "README.md").read_text(), flags=re.S)  # front matter
    h, w, D = pipe.rqvae.code_shape
    params = sum(p.numel() for m in (pipe.rqvae, pipe.transformer) for p in m.parameters())
    c, names = pipe.transformer.config, pipe.class_names  # ImageNet's 1,000: the first few
    facts = (f"### This model\n{pipe.resolution} px images as {h}×{w}×{D} codes from a codebook of "
             f"{c.codebook_size}; {params / 1e6:.1f} M parameters; running on `{pipe.device}`. "
             f"{pipe.class_title} choices: {', '.join(class_label(pipe, n) for n in names[:24]) or 'none'}"
             f"{f' ... ({len(names):,} in all)' if len(names) > 24 else ''}. "
             f"Prompts: {f'up to {c.max_text_len} tokens' if pipe.has_text else 'none (no text conditioning)'}.")
    return "\n\n".join(filter(None, [text.strip() or "## RQ-VAE + RQ-Transformer", facts, METHOD]))


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


def build_demo(pipe_or_path) -> gr.Blocks:
    """A Blocks app around an RQPipeline, a saved pipeline folder or a Hub repo id (ValueError if it can't be
    loaded)."""
    pipe = pipe_or_path if isinstance(pipe_or_path, RQPipeline) else RQPipeline.from_pretrained(pipe_or_path)
    weights = None if pipe is pipe_or_path else pipe.folder  # for a Hub repo id: its snapshot in the Hub cache
    h, w, D = pipe.rqvae.code_shape
    K = pipe.transformer.config.codebook_size
    title = pipe.class_title  # what the classes are ("Class", "Style", ...)
    by_label = sorted(((class_label(pipe, n), n) for n in pipe.class_names), key=lambda c: c[0].casefold())
    choices = [(f"Random {title.lower()}", RANDOM_CLASS)] + by_label  # in the order of what the user reads
    has_classes = bool(pipe.class_names)  # a model without classes (unconditional or text only) hides the dropdown
    example_images = sorted(weights.glob("examples/*.png"))[:6] if weights else []
    prompts = pipe.prompts
    # the first prompts of prompts.json (training puts a spread of them first); "" only where the model allows it
    example_prompts = prompts[:5] or ([""] if pipe.caption_dropout != 0 else [])
    chosen = pipe.examples
    pictured = [e for e in chosen if weights and e.get("image") and (weights / e["image"]).is_file()]

    @gpu
    def generate(class_name=RANDOM_CLASS, num_images=4, seed=0, temperature=1.0, top_k=0, top_p=1.0,
                 guidance_scale=None, prompt="", progress=gr.Progress()):
        seed = check_seed(seed)
        num_images = check_whole(num_images, "Number of images", 1, pipe.max_images)
        top_k = check_whole(top_k, "Top-k (0 = off)", 0, K)
        labels = pick_labels(pipe.class_names, class_name, num_images, seed)
        generator = torch.Generator(pipe.device).manual_seed(seed)
        progress(0, desc="Sampling")
        with user_errors():
            # latest_only: previews never hold sampling back (a slow CPU or browser sees fewer of them);
            # min_interval: fewer previews to decode and send (whole answer 0.57-0.64 -> 0.40-0.46 s, 2 cores)
            for i, out in enumerate(pipe.stream(labels, pick_prompt(prompt), num_images, temperature,
                                                generator=generator, guidance_scale=guidance_scale,
                                                latest_only=True, min_interval=PREVIEW_INTERVAL,
                                                **sampling_filters(top_k, top_p))):
                if i == 0:
                    warn_truncated(pipe, out)
                progress(out.done, desc="Sampling" if out.done < 1 else "Done")
                yield list(zip(map(upscale, out.images), captions(pipe, out)))

    @gpu
    @torch.inference_mode()
    def reconstruct(image):
        if image is None:
            raise gr.Error("upload an image (or pick an example) to reconstruct")
        with user_errors():
            image.load()
            rec = pipe.reconstruct(image)
        strip = [(upscale(rec.input_image), "input (resized)")]
        strip += [(upscale(im), f"depth {k}: {p:.1f} dB") for k, (im, p) in enumerate(zip(rec.images, rec.psnr), 1)]
        return strip, code_map(rec.codes)

    @gpu
    @torch.inference_mode()
    def complete(image, class_name=RANDOM_CLASS, num_images=4, seed=0, use_box=False, x0=0.25, y0=0.25,
                 x1=0.75, y1=0.75, prompt=""):
        """image: the editor value {"background": image, "layers": [mask images], "composite": ...}."""
        seed = check_seed(seed)
        num_images = check_whole(num_images, "Number of images", 1, pipe.max_images)
        if not image or image.get("background") is None:
            raise gr.Error("upload an image to complete")
        background = image["background"]
        labels = pick_labels(pipe.class_names, class_name, num_images, seed)
        with user_errors():
            background.load()
            mask = editor_mask(image, (x0, y0, x1, y1) if use_box else None)
            out = pipe.complete(background, mask, labels, pick_prompt(prompt), num_images=num_images,
                                generator=torch.Generator(pipe.device).manual_seed(seed))
        warn_truncated(pipe, out)
        shown = upscale(out.input_image)  # the input as the model saw it
        shade = Image.fromarray((~out.keep_mask).numpy().astype(np.uint8) * 128).resize(shown.size, Image.NEAREST)
        shown.paste(Image.new("RGB", shown.size, (255, 0, 255)), mask=shade)  # magenta over regenerated cells
        return [(shown, "shaded = regenerated")] + list(zip(map(upscale, out.images), captions(pipe, out)))

    def generate_final(class_name, num_images, seed, prompt=""):  # for the cached examples
        *_, last = generate(class_name, num_images, seed, prompt=prompt)
        return last

    def prompt_box():
        """The prompt textbox and its random-prompt button (shown for models with text only)."""
        with gr.Row(equal_height=True, visible=pipe.has_text):
            box = gr.Textbox("", label="Prompt", placeholder=f"e.g. {prompts[0]}" if prompts else "describe the image",
                             max_lines=3, scale=4, visible=pipe.has_text)
            dice = gr.Button("🎲 Random prompt", scale=1, min_width=90, visible=bool(prompts))
        dice.click(lambda: random.choice(prompts or [""]), None, box, api_visibility="private", queue=False)
        return box

    with examples_cache(weights), gr.Blocks(title="RQ image generator", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# RQ-VAE + RQ-Transformer\nEach {pipe.resolution} px image is a stack of {h}×{w}×{D} codes: "
                    "code 1 of every cell sketches it, each further code refines the residual. The transformer "
                    "writes the cells row by row, so you watch the image appear.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    prompt = prompt_box()
                    cls = gr.Dropdown(choices, value=RANDOM_CLASS, label=title, visible=has_classes)
                    num = gr.Slider(1, pipe.max_images, value=min(4, pipe.max_images), step=1,
                                    label="Number of images")
                    with gr.Row(equal_height=True):
                        seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", scale=4)
                        dice = gr.Button("🎲 Random", scale=1, min_width=90)
                    with gr.Accordion("Sampling", open=False):
                        temp = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
                        # 0 / 1 with both left there: the model's own defaults (pipeline.json; converted models)
                        unset = "the model's" if pipe.top_k is not None or pipe.top_p is not None else "off"
                        top_k = gr.Slider(0, K, value=0, step=1, label=f"Top-k (0 = {unset})")
                        top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label=f"Top-p (1 = {unset})")
                        # hidden where the null class was never trained (converted official models): always 1
                        cfg = gr.Slider(0.0, max(10.0, pipe.default_guidance_scale), step=0.1, visible=pipe.guidance,
                                        value=pipe.default_guidance_scale, label="Guidance scale (1 = off)")
                    go = gr.Button("Generate", variant="primary")
                gallery = gr.Gallery(label="Samples", elem_id="samples", columns=4, height=440, format="png",
                                     object_fit="contain", buttons=["download", "download_all", "fullscreen"], scale=2)
            dice.click(lambda: random.randint(0, 2**31 - 1), None, seed, api_visibility="private", queue=False)
            # prompt last: positional API calls made before models had text still work
            go.click(generate, [cls, num, seed, temp, top_k, top_p, cfg, prompt], gallery, api_name="generate",
                     concurrency_id="model")
            n = min(4, pipe.max_images)
            if chosen:  # pipeline.json's examples: (prompt, class) pairs the evaluation scored well
                rows = [[e.get("class", RANDOM_CLASS), n, i] + ([e["prompt"]] if pipe.has_text else [])
                        for i, e in enumerate(chosen[:6])]
            elif pipe.has_text:  # with classes too: each example prompt in another class (e.g. style)
                rows = [[pipe.class_names[i % len(pipe.class_names)] if has_classes else RANDOM_CLASS, n, i, p]
                        for i, p in enumerate(example_prompts)]
            else:
                rows = [[RANDOM_CLASS, n, 0]] + [[c, n, 1] for c in pipe.class_names[:3]]
            if rows:
                gr.Examples(rows, [cls, num, seed, prompt][:len(rows[0])], gallery, generate_final,
                            cache_examples=True, cache_mode="lazy", label="Examples (cached after first use)")
        with gr.Tab("Reconstruct"):
            gr.Markdown(f"Encode an image into its {h}×{w}×{D} code stack and decode it using only the first "
                        f"1..{D} codes per cell: PSNR (dB, higher is closer) grows with every depth.")
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    rec_in = gr.Image(type="pil", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                      height=300, elem_classes="pixelated")
                    rec_btn = gr.Button("Reconstruct", variant="primary")
                with gr.Column(scale=2):
                    strip = gr.Gallery(label="Reconstruction by depth", columns=D + 1, rows=1, height=260,
                                       format="png", object_fit="contain")
                    gr.Markdown(f"**Code grid** below: each cell is one of the {h}×{w} code positions; its colour and "
                                "number are the code index chosen at depth 1 (same colour = same code).")
                    heat = gr.Image(label="Code grid (depth 1)", format="png", height=320, interactive=False)
            gr.on([rec_btn.click, rec_in.upload], reconstruct, rec_in, [strip, heat], api_name="reconstruct",
                  concurrency_id="model")
            if example_images:
                gr.Examples([[str(p)] for p in example_images], rec_in, [strip, heat], reconstruct,
                            cache_examples=True, cache_mode="lazy")
        with gr.Tab("Complete"):
            gr.Markdown("Paint over the part to regenerate (or use a box); the other code positions are kept and "
                        "the transformer fills in the painted ones.")
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    brush = gr.Brush(default_size=max(1, pipe.resolution // 16), colors=[("#ff00ff", 0.7)],
                                     color_mode="fixed")  # radius in image pixels; any painted pixel counts
                    editor = gr.ImageEditor(type="pil", image_mode="RGBA", label="Image", brush=brush, layers=False,
                                            sources=["upload", "clipboard"], transforms=(), height=360)
                    c_prompt = prompt_box()
                    c_cls = gr.Dropdown(choices, value=RANDOM_CLASS, label=title, visible=has_classes)
                    c_num = gr.Slider(1, pipe.max_images, value=min(4, pipe.max_images), step=1,
                                      label="Number of images")
                    c_seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    with gr.Accordion("Box mask (instead of painting)", open=False):
                        use_box = gr.Checkbox(False, label="Use a box mask (fractions of the image)")
                        box = [gr.Slider(0, 1, value=v, step=0.05, label=n) for n, v in
                               zip(["x0 (left)", "y0 (top)", "x1 (right)", "y1 (bottom)"], [0.25, 0.25, 0.75, 0.75])]
                    c_btn = gr.Button("Complete", variant="primary")
                completed = gr.Gallery(label="Completions", columns=3, height=620, format="png", scale=2)
            c_inputs = [editor, c_cls, c_num, c_seed, use_box, *box, c_prompt]
            c_btn.click(complete, c_inputs, completed, api_name="complete", concurrency_id="model")
            tails = [[p] for p in example_prompts] if pipe.has_text else [[]]  # the prompt column of text models
            rows = [[str(p), RANDOM_CLASS, n, 0, True, 0.0, 0.5, 1.0, 1.0] + tails[i % len(tails)]
                    for i, p in enumerate(example_images[:3] if tails else [])]
            if pictured:  # each image with its own name and class
                rows = [[str(weights / e["image"]), e.get("class", RANDOM_CLASS), n, 0, True, 0.0, 0.5, 1.0, 1.0]
                        + ([e["prompt"]] if pipe.has_text else []) for e in pictured[:3]]
            if rows:
                gr.Examples(rows, c_inputs[:len(rows[0])], completed, complete, cache_examples=True,
                            cache_mode="lazy", label="Examples (bottom half regenerated)")
        with gr.Tab("About"):
            gr.Markdown(model_card(weights, pipe))
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=os.environ.get("RQ_WEIGHTS") or str(DEFAULT_WEIGHTS),
                        help="saved RQPipeline folder or Hub repo id user/name (default: $RQ_WEIGHTS or "
                             "weights/emoji-64)")
    args = parser.parse_args(argv)
    try:
        ui = build_demo(args.weights)
    except Exception as e:  # noqa: BLE001 - missing or invalid weights: one line, no traceback
        if not os.environ.get("SPACE_ID"):
            print(f"app.py: cannot load weights from {args.weights}: {e}", file=sys.stderr)
            sys.exit(2)
        ui = error_demo(str(e))  # on a Space, show the reason in the page
    ui.launch(**LAUNCH_KWARGS)


if __name__ == "__main__":
    main()

"""The app's side of each call: checks that turn bad inputs into one-line gr.Error messages, inputs as the
pipeline takes them, and the pictures the app draws (upscaled outputs, the code grid, masks from the editor)."""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
from contextlib import contextmanager

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipelines.batching import MAX_ROWS, Busy
from pipelines.rq_pipeline import CPU_DECODERS
from rqtransformer.cpu_weights import CPU_WEIGHTS
from rqcore.images import MAX_IMAGE_PIXELS, mask_layer

MAX_SEED = 2**63 - 1
DISPLAY = 256  # outputs are upscaled (nearest neighbour) to about this many pixels

RANDOM_CLASS = "Random class"  # the class dropdown's first choice (any model: also "Random <class title>")


def named_errors(component: gr.components.Component) -> None:
    """Make `component`'s input errors start with its label, and turn unreadable uploads into a clear
    gr.Error instead of a traceback. (Wraps the instance's preprocess: a Component subclass would make
    gradio write a .pyi stub next to the app.)"""
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
    """The pipeline's ValueErrors, the batcher's Busy and PIL's errors on bad uploads -> gr.Error (a message,
    no traceback)."""
    try:
        yield
    except gr.Error:
        raise
    except Busy as e:
        raise gr.Error(str(e)) from None
    except Image.DecompressionBombError as e:
        raise gr.Error(f"the image is too large: {e}") from None
    except ValueError as e:
        raise gr.Error(str(e)) from None
    except (OSError, SyntaxError) as e:
        raise gr.Error(f"could not read the image: {e}") from None


def pick_labels(class_names: list[str], choice: str | None, num_images: int, seed: int,
                random_choice: str = RANDOM_CLASS) -> str | list[str] | None:
    """The dropdown value -> class_labels for the pipeline, which checks them: "Random class" (or the model's
    `random_choice`) draws one name per image from the seed (None for an unconditional model); any other
    value is passed on."""
    if choice not in (None, "", RANDOM_CLASS, random_choice):
        return choice  # the pipeline repeats it num_images times
    if not class_names:
        return None
    rng = random.Random(seed)
    return [rng.choice(class_names) for _ in range(num_images)]


def int_env(name: str, default: int) -> int:
    """A whole number from the environment variable `name` (unset or empty: default), else one line and exit 2."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        print(f"app.py: ${name} must be a whole number, got {value!r}", file=sys.stderr)
        sys.exit(2)


def parse_app_args(argv, description: str, default_weights) -> argparse.Namespace:
    """app.py's command line: --weights, --max_rows, --cpu_weights (each with its environment variable)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--weights", default=os.environ.get("RQ_WEIGHTS") or str(default_weights),
                        help="saved RQPipeline folder, Hub repo id user/name, or official:NAME (a paper release, "
                             "fetched into the cache once) (default: $RQ_WEIGHTS or weights/emoji-64)")
    parser.add_argument("--max_rows", type=int, default=int_env("RQ_MAX_ROWS", MAX_ROWS),
                        help="transformer rows per batch of concurrent requests: a guided request of n images "
                             f"takes 2n (default: $RQ_MAX_ROWS or {MAX_ROWS}; memory grows with it)")
    parser.add_argument("--cpu_weights", default=os.environ.get("RQ_CPU_WEIGHTS") or "auto",
                        choices=("auto", *CPU_WEIGHTS),
                        help="what the transformer samples with on a CPU; auto: the fastest within the fidelity "
                             "bound on this CPU, see docs/performance.md (default: $RQ_CPU_WEIGHTS or auto)")
    parser.add_argument("--cpu_decoder", default=os.environ.get("RQ_CPU_DECODER") or "auto", choices=CPU_DECODERS,
                        help="the decoder's arithmetic on a CPU; auto: bfloat16 where the CPU multiplies it "
                             "natively (default: $RQ_CPU_DECODER or auto)")
    args = parser.parse_args(argv)
    if args.max_rows < 1:
        parser.error(f"--max_rows must be at least 1, got {args.max_rows}")
    for name, choices in (("cpu_weights", ("auto", *CPU_WEIGHTS)), ("cpu_decoder", CPU_DECODERS)):
        if getattr(args, name) not in choices:  # from the environment (argparse checks only the flag)
            parser.error(f"${'RQ_' + name.upper()} must be one of {', '.join(choices)}, got {getattr(args, name)!r}")
    return args


def resolve_weights(weights: str) -> str:
    """--weights / RQ_WEIGHTS as the pipeline loads it: `official:NAME` is a released model, fetched and converted
    into the cache once (python -m official.fetch_official NAME); anything else is passed on as given."""
    if not isinstance(weights, str) or not weights.startswith("official:"):
        return weights
    from official.fetch_official import fetch_official  # only here: importing the app loads nothing

    return str(fetch_official(weights.removeprefix("official:")))


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


def pick_prompt(prompt: str | None) -> str | None:
    """The prompt box -> the pipeline's prompt: blank = None (no prompt), which the pipeline accepts or
    refuses depending on the model; anything else is passed on as typed."""
    return prompt if prompt and prompt.strip() else None


def warn_truncated(pipe, out) -> None:
    """A prompt longer than the model reads was cut: say so (a notice, not an error)."""
    if out.truncated_prompts:
        gr.Warning(f"Prompt too long: the model reads its first {pipe.transformer.config.max_text_len} tokens "
                   "only; the rest was ignored")


def sampling_filters(top_k, top_p) -> dict:
    """The sliders' "off" values (top-k 0, top-p 1) -> None, as the pipeline takes them."""
    return dict(top_k=int(top_k) if top_k else None, top_p=float(top_p) if top_p < 1 else None)


def upscale(image: Image.Image, size: int = DISPLAY) -> Image.Image:
    f = max(1, size // max(image.size))
    return image.resize((image.width * f, image.height * f), Image.NEAREST)


def shade_regenerated(image: Image.Image, keep_mask: torch.Tensor) -> Image.Image:
    """The input as the model saw it, upscaled, magenta over the code cells that were regenerated."""
    shown = upscale(image)
    shade = Image.fromarray((~keep_mask).numpy().astype(np.uint8) * 128).resize(shown.size, Image.NEAREST)
    shown.paste(Image.new("RGB", shown.size, (255, 0, 255)), mask=shade)
    return shown


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
        layer, painted = mask_layer(layer.convert("RGBA").resize(image.size, Image.NEAREST))
        mask |= np.asarray(layer) > (32 if painted else 127)  # faint stroke edges still count as painted
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

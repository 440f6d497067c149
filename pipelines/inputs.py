"""User-input checks of RQPipeline: its options and files (pipeline.json, prompts.json), class labels,
prompts and the batch size they make together. Each bad input is one ValueError line saying what is allowed."""
from __future__ import annotations

import difflib
import json
from pathlib import Path

from rqcore.checks import is_number, is_whole

MAX_IMAGES_LIMIT = 64  # per request; a pipeline.json from elsewhere cannot raise the app's cap beyond this
OPTIONS = ("max_images", "default_guidance_scale", "caption_dropout", "class_title", "class_display_names",
           "guidance", "top_k", "top_p", "examples")  # the keys of pipeline.json
EXAMPLE_KEYS = ("prompt", "class", "image")  # an entry of pipeline.json's examples
PROMPT_CHARS_PER_TOKEN = 64  # longer prompts are cut to this many characters per token before tokenizing

def check_options(max_images, default_guidance_scale, caption_dropout, class_title="Class", guidance=True) -> None:
    if not (is_whole(max_images) and 1 <= max_images <= MAX_IMAGES_LIMIT):
        raise ValueError(f"max_images must be a positive integer <= {MAX_IMAGES_LIMIT}, got {max_images!r}")
    if not (is_number(default_guidance_scale) and 0 <= default_guidance_scale < float("inf")):
        raise ValueError(f"default_guidance_scale must be a number >= 0 (1 = no guidance), "
                         f"got {default_guidance_scale!r}")
    if caption_dropout is not None and not (is_number(caption_dropout) and 0 <= caption_dropout < 1):
        raise ValueError(f"caption_dropout must be None (unknown) or the training's rate in [0, 1), "
                         f"got {caption_dropout!r}")
    if not short_label(class_title):
        raise ValueError(f"class_title must be a short name for what the classes are (e.g. 'Style'), "
                         f"got {class_title!r:.60}")
    if not isinstance(guidance, bool) or (not guidance and default_guidance_scale != 1):
        raise ValueError(f"guidance must be true or false (false: the null class is untrained, so "
                         f"default_guidance_scale must be 1), got {guidance!r}")

def short_label(value) -> bool:
    return isinstance(value, str) and 0 < len(value.strip()) <= 40 and value.isprintable()

def check_display_names(display_names, class_names: list[str]) -> dict[str, str]:
    """class_display_names: {class name: the name people know it by} -> the same, stripped. Classes left out
    are shown as their names, prettified. A display name also works as a class label, so it must not be
    another class's name or shared by two classes."""
    if display_names is None:
        return {}
    if not isinstance(display_names, dict):
        raise ValueError(f"class_display_names must map class names to display names, "
                         f"got {type(display_names).__name__}")
    shown, owners = {}, {}  # owners: casefolded display name -> the class that has it
    for name, label in display_names.items():
        if name not in class_names:
            raise ValueError(f"class_display_names: {name!r} is not a class of this model; "
                             f"its classes are {class_names[:20]}")
        if not short_label(label):
            raise ValueError(f"class_display_names: the display name of {name!r} must be a short name "
                             f"(1-40 printable characters), got {label!r:.60}")
        label = shown[name] = label.strip()
        owner = owners.setdefault(label.casefold(), name)
        clash = None
        if owner != name:  # another class has this display name
            clash = owner
        elif label in class_names and label != name:  # it is another class's own name
            clash = label
        if clash:
            raise ValueError(f"class_display_names: {label!r} would name two classes, {clash!r} and {name!r}")
    return shown

def check_examples(examples, class_names: list[str], has_text: bool) -> list[dict]:
    """examples: the app's examples, chosen by measurement: a list of {"prompt": a prompt (text models),
    "class": a class name (models with classes), "image": optional, a PNG under the folder's examples/ that
    the Complete tab regenerates with that prompt and class} -> the same list, checked."""
    if examples is None:
        return []
    if not isinstance(examples, list):
        raise ValueError(f"examples must be a list of {{\"prompt\", \"class\", \"image\"}} objects, "
                         f"got {type(examples).__name__}")
    for i, e in enumerate(examples):
        where = f"examples[{i}]"
        if not isinstance(e, dict) or set(e) - set(EXAMPLE_KEYS):
            raise ValueError(f"{where} must be an object with some of {list(EXAMPLE_KEYS)}, got {str(e):.60}")
        if has_text != isinstance(e.get("prompt"), str) or (has_text and not e["prompt"].strip()):
            want = "a non-empty prompt string" if has_text else "no prompt (the model has no text conditioning)"
            raise ValueError(f"{where} needs {want}, got {e.get('prompt')!r:.60}")
        if bool(class_names) != ("class" in e) or ("class" in e and e["class"] not in class_names):
            want = f"a class, one of {class_names[:20]}" if class_names else "no class (the model has none)"
            raise ValueError(f"{where} needs {want}, got {e.get('class')!r:.60}")
        image = e.get("image")
        if image is not None and not (isinstance(image, str) and image.startswith("examples/")
                                      and image.endswith(".png") and ".." not in Path(image).parts):
            raise ValueError(f"{where}: image must be a .png path under examples/, got {image!r:.60}")
    return [dict(e) for e in examples]

def read_options(file: Path) -> dict:
    """pipeline.json -> the constructor's options (checked by the constructor); no file = defaults."""
    if not file.is_file():
        return {}
    try:
        options = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{file}: expected a JSON object with some of {list(OPTIONS)}, "
                         f"got {type(options).__name__}")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"{file}: unexpected content {sorted(map(str, unknown))}")
    return options

def check_prompt_list(prompts, what: str) -> list[str]:
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{what} must be a list of prompt strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"{what} must be a list of prompt strings; item {i} is {type(p).__name__} {p!r:.60}")
    return list(prompts)

def read_prompts(file: Path) -> list[str]:
    """prompts.json (a JSON list of training captions, for examples) -> list[str]; no file = []."""
    if not file.is_file():
        return []
    try:
        prompts = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    return check_prompt_list(prompts, str(file))

def class_index(label, names: list[str], aliases: dict[str, str] | None = None) -> int:
    """A class name, a display name (aliases: display name -> class name) or an index -> the index."""
    if isinstance(label, str):
        aliases = aliases or {}
        label = aliases.get(label, label)
        if label not in names:
            close = difflib.get_close_matches(label, names + list(aliases), n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            shown = names if len(names) <= 20 else names[:20] + [f"... ({len(names)} classes in class_names)"]
            also = f" (or a display name: {list(aliases)[:20]})" if aliases else ""
            raise ValueError(f"unknown class {label!r}; {hint}choose one of {shown}{also}")
        return names.index(label)
    if not is_whole(label):
        raise ValueError(f"class labels must be class names or indices, got {label!r}")
    if not 0 <= label < len(names):
        raise ValueError(f"class index {label} is out of range 0..{len(names) - 1}")
    return int(label)

def check_num_images(num_images, max_images: int) -> None:
    if num_images is not None and not (is_whole(num_images) and 1 <= num_images <= max_images):
        raise ValueError(f"num_images must be a whole number from 1 to {max_images} (or None: one image per "
                         f"label or prompt), got {num_images!r}")

def label_list(class_labels, names: list[str], num_classes: int, max_images: int,
               aliases: dict[str, str] | None = None) -> list[int] | None:
    """Class names/indices (one, a list, a 1-D array or tensor) -> class indices; None = no class."""
    if class_labels is None:
        return None
    if num_classes == 0:
        raise ValueError("this model is unconditional: leave class_labels empty (None)")
    if hasattr(class_labels, "ndim") and hasattr(class_labels, "tolist"):  # numpy array or torch tensor
        if class_labels.ndim > 1:
            raise ValueError(f"class labels must be one name or index per image (1-D), "
                             f"got shape {tuple(class_labels.shape)}")
        items = class_labels.reshape(-1).tolist()
    else:
        items = list(class_labels) if isinstance(class_labels, (list, tuple)) else [class_labels]
    if not 1 <= len(items) <= max_images:
        raise ValueError(f"give 1 to {max_images} class labels, got {len(items)}")
    return [class_index(item, names, aliases) for item in items]

def prompt_list(prompt, has_text: bool, max_images: int) -> list[str] | None:
    """A prompt string, or a list of them (one per image) -> list[str]; None = no prompt."""
    if prompt is None:
        return None
    if not has_text:
        raise ValueError("this model has no text conditioning: leave prompt empty (None); it was trained on "
                         "images without captions")
    if isinstance(prompt, str):
        return [valid_unicode(prompt)]
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt must be a string or a list of strings (one per image), got {type(prompt).__name__}")
    if not 1 <= len(prompt) <= max_images:
        raise ValueError(f"give 1 to {max_images} prompts, got {len(prompt)}")
    for i, p in enumerate(prompt):
        if not isinstance(p, str):
            raise ValueError(f"prompts must be strings; prompt {i} is {type(p).__name__} {p!r:.60}")
    return [valid_unicode(p) for p in prompt]

def batch_size(labels: list | None, prompts: list | None, num_images) -> int:
    """One label (prompt) is repeated num_images times (default 1); several make one image each, so num_images
    must then be None or their count, and several labels and several prompts must be as many."""
    n_labels, n_prompts = len(labels or ()), len(prompts or ())
    if n_labels > 1 and n_prompts > 1 and n_labels != n_prompts:
        raise ValueError(f"{n_labels} class labels but {n_prompts} prompts: give one of either to repeat, "
                         f"or one label and one prompt per image")
    for n, what, one in ((n_labels, "class labels", "label"), (n_prompts, "prompts", "prompt")):
        if n > 1:
            if num_images is not None and num_images != n:
                raise ValueError(f"{n} {what} but num_images={num_images}: give one {one} to repeat, or one per "
                                 f"image (and leave num_images None)")
            return n
    return int(num_images or 1)

def valid_unicode(text: str) -> str:
    """Surrogate code points (from JSON escapes or a broken client) paired up into characters, lone ones
    replaced by U+FFFD: the tokenizer (and any JSON encoder) takes valid Unicode only."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

def clean_prompt(text: str, max_text_len: int) -> tuple[str, bool]:
    """-> (the prompt to tokenize, whether it was cut). A huge prompt is cut to a generous number of
    characters first, so that it costs no more to tokenize than a sensible one."""
    cap = PROMPT_CHARS_PER_TOKEN * max_text_len
    if len(text) <= cap:
        return text, False
    short = " ".join(text[:4 * cap].split())  # whitespace runs count once, as the tokenizer normalises them
    return short[:cap], len(short) > cap or len(text) > 4 * cap

"""What a stage-2 run trains on, settled before anything is encoded: the data sets and their classes, what
--init_from brings (its classes, sampling options, tokenizer), the prompt tokenizer and the model config."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipelines.inputs import check_display_names, read_options
from rqtransformer.model import PRESETS, TOKENIZER_NAME, RQTransformerConfig
from rqtransformer.tokenizer import PromptTokenizer

from . import cli
from .captions import caption_tokenizer
from .data import METADATA, CaptionedImageFolder, any_image_folder, has_captions
from .hf_data import hub_dataset, train_data

TEXT_DEFAULTS = dict(caption_column="text", text_vocab_size=2048, max_text_len=32, caption_dropout=0.1)


@dataclasses.dataclass
class Plan:
    """The run's data and conditioning, checked: `plan_run` fills it in, main reads it."""
    train_set: object
    val_set: object | None
    classes: list[str]  # the model's classes (the data's, or --init_from's when the data names some of them)
    data_flag: str  # the flag the training data came from, for messages
    saved: RQTransformerConfig | None = None  # --init_from's config
    data_classes: list[str] | None = None  # the data's class names where they differ from `classes`
    class_rows: list | None = None  # --init_from's class row of each class (None: a new class)
    options: dict = dataclasses.field(default_factory=dict)  # --init_from's pipeline options
    tokenizer: PromptTokenizer | None = None
    tokenizer_file: Path | None = None  # where a newly trained tokenizer is saved
    max_text_len: int = 0
    text_rows: int = 0  # the saved model's text embedding rows, before any new name token
    name_dropout: float = 0.0

    @property
    def captioned(self) -> bool:
        return isinstance(self.train_set, CaptionedImageFolder)


def load_data(args, resolution: int):
    """(train set, validation set or None): ImageFolders, or captioned folders (a metadata.jsonl), every
    image and caption checked before anything is encoded. Fills in the text defaults for captioned data."""
    column = args.caption_column or TEXT_DEFAULTS["caption_column"]
    train_set = train_data(args, resolution, column)
    if not isinstance(train_set, CaptionedImageFolder):
        given = [f"--{name}" for name in TEXT_DEFAULTS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{given[0]} needs captions: " + (f"--data_dir {args.data_dir} has no {METADATA}"
                             if args.data_dir else f"--dataset_name {args.dataset_name} has no column '{column}'"))
    elif args.caption_dropout is None:
        args.caption_dropout = TEXT_DEFAULTS["caption_dropout"]
    val_set = None
    if args.validation_split:  # a held-out split: captions required when training on them
        val_set = hub_dataset(args, resolution, args.validation_split, isinstance(train_set, CaptionedImageFolder))
    if args.validation_dir:
        if isinstance(train_set, CaptionedImageFolder) and Path(args.validation_dir).is_dir() \
                and not has_captions(args.validation_dir):
            raise ValueError(f"--validation_dir {args.validation_dir} has no {METADATA}: the held-out loss of a "
                             f"caption model needs the captions of the validation images")
        val_set = any_image_folder(args.validation_dir, resolution, column)
    return train_set, val_set


def plan_run(args, resolution: int, out: Path) -> Plan:
    """Load and check the data, --init_from and the prompt tokenizer, all before the encoding, which takes
    minutes on a large folder."""
    train_set, val_set = load_data(args, resolution)
    data_flag = f"--data_dir {args.data_dir}" if args.data_dir else f"--dataset_name {args.dataset_name}"
    p = Plan(train_set, val_set, [] if args.unconditional else train_set.classes, data_flag)
    check_validation_classes(args, p)
    if args.init_from:
        fit_init_from(args, p)
    set_tokenizer(args, p, out)
    return p


def check_validation_classes(args, p: Plan) -> None:
    """The held-out data's classes must be the training data's (or some of them)."""
    if p.val_set is None or not p.classes:
        return
    val_flag = (f"--validation_dir {args.validation_dir}" if args.validation_dir
                else f"--validation_split {args.validation_split}")
    if not p.val_set.classes:
        raise ValueError(f"{val_flag} has no classes but {p.data_flag} has classes {p.classes}: give it the same "
                         "classes, or pass --unconditional")
    unknown = sorted(set(p.val_set.classes) - set(p.classes))
    if unknown:
        raise ValueError(f"{val_flag} has classes that {p.data_flag} lacks: {unknown}")


def fit_init_from(args, p: Plan) -> None:
    """Fit the data's classes to --init_from's, naming the classes that differ, not just the tensor
    (class_emb) that does not fit; reads its pipeline options."""
    saved = p.saved = cli.config_from_arg(RQTransformerConfig, PRESETS, args.init_from, "--init_from")
    # a pipeline's sampling defaults and whether its null class was ever trained (not for converted models)
    p.options = read_options(Path(args.init_from).parent / "pipeline.json")
    names = saved.class_names or [str(i) for i in range(saved.num_classes)]  # as the pipeline shows them
    p.options["class_display_names"] = check_display_names(p.options.get("class_display_names"), names)
    classes = p.classes
    if classes and set(classes) <= set(names) and classes != names:
        p.data_classes, p.classes = classes, names  # folders named after some of the model's classes
    elif saved.class_names and set(classes) > set(names):  # new classes beside all of the model's
        p.class_rows = [names.index(c) if c in names else None for c in classes]
    if saved.num_classes != len(p.classes) and not p.class_rows:
        data = ("--unconditional" if args.unconditional else f"the data has {len(p.classes)} {p.classes}"
                if p.classes else f"{p.data_flag} has no class sub-folders")
        raise ValueError(f"--init_from {args.init_from} has {saved.num_classes} classes "
                         f"{names[:8]}{' ...' if saved.num_classes > 8 else ''}, {data}: "
                         "fine-tuning needs its classes (folders named after some or all of them, plus new ones)"
                         + ("; add --unconditional" if not saved.num_classes else ""))
    if p.captioned and not saved.max_text_len:
        raise ValueError(f"--init_from {args.init_from} has no text conditioning but {p.data_flag} is captioned: "
                         "a caption model cannot start from it; train one without --init_from")
    if saved.max_text_len and not p.captioned:
        raise ValueError(f"--init_from {args.init_from} is a text-conditioned model but {p.data_flag} has no "
                         f"captions ({METADATA} or a caption column): fine-tuning it needs captioned images")


def set_tokenizer(args, p: Plan, out: Path) -> None:
    """The prompt tokenizer: --init_from's own, else one trained on the training captions; name tokens and
    their dropout."""
    saved = p.saved
    if p.captioned and saved is not None:  # fine-tuning: the model's own tokenizer and prompt length
        if args.text_vocab_size is not None:
            raise ValueError(f"--init_from {args.init_from} brings its own tokenizer: drop --text_vocab_size")
        if args.max_text_len not in (None, saved.max_text_len):
            raise ValueError(f"--max_text_len {args.max_text_len} differs from --init_from's {saved.max_text_len}: "
                             "fine-tuning keeps the model's prompt length (drop --max_text_len)")
        p.tokenizer = PromptTokenizer.from_file(Path(args.init_from) / TOKENIZER_NAME)
        p.max_text_len = saved.max_text_len
        if p.tokenizer.vocab_size != saved.text_vocab_size:
            raise ValueError(f"--init_from {args.init_from}: its {TOKENIZER_NAME} has {p.tokenizer.vocab_size} "
                             f"tokens, its config's text_vocab_size is {saved.text_vocab_size}")
    elif p.captioned:  # trained on the training captions (its real size may be below --text_vocab_size)
        p.tokenizer, p.tokenizer_file = caption_tokenizer(
            p.train_set.captions, args.text_vocab_size or TEXT_DEFAULTS["text_vocab_size"], out, args.name_tokens)
        p.max_text_len = args.max_text_len or TEXT_DEFAULTS["max_text_len"]
    if args.name_tokens and not p.captioned:
        raise ValueError(f"--name_tokens needs captions: {p.data_flag} has none")
    tokenizer = p.tokenizer
    p.text_rows = tokenizer.vocab_size if tokenizer else 0
    if args.name_tokens and saved is not None:  # the same names in the same order: a resumed run gets the same ids
        tokenizer.add_names(p.train_set.captions)
    if args.name_dropout is not None and not (tokenizer and tokenizer.name_ids):
        raise ValueError("--name_dropout needs name tokens: add --name_tokens (or --init_from a model with them)")
    if tokenizer and tokenizer.name_ids:
        p.name_dropout = 0.5 if args.name_dropout is None else args.name_dropout


def model_config(args, vae_config, p: Plan) -> RQTransformerConfig:
    """--config (or --init_from's) fitted to the RQ-VAE's codes, the classes and the prompt tokenizer."""
    # a new text model pools its prompt unless told not to; --init_from keeps the saved model's choice
    text_pool = args.text_pool if args.text_pool is not None else p.saved.text_pool if p.saved else p.captioned or None
    return cli.config_from_arg(RQTransformerConfig, PRESETS, args.config, args.config_flag,
                               codebook_size=vae_config.codebook_size, code_shape=vae_config.code_shape,
                               num_classes=len(p.classes), class_names=p.classes,
                               text_vocab_size=p.tokenizer.vocab_size if p.tokenizer else 0,
                               max_text_len=p.max_text_len, text_pool=text_pool, dropout=args.dropout)


def by_name(labels: torch.Tensor, names: list[str], model_names: list[str]) -> torch.Tensor:
    """Class indices into `names` -> indices into `model_names` (the same class names)."""
    return torch.tensor([model_names.index(c) for c in names])[labels]

"""Fidelity and speed of the CPU weight copies (float16, int8, int4) against float32 on the same weights.

    .venv/bin/python -m bench.precision                                  # official fixtures + FFHQ size
    .venv/bin/python -m bench.precision --data_dir data/emoji/test       # + the bundled model's held-out codes
    .venv/bin/python -m bench.precision --weights official:ffhq          # + a released model, on its own samples
    .venv/bin/python -m bench.precision --quick                          # tiny sizes: checks the script

Fidelity (one record per model and copy): the teacher-forced next-code distributions of the copy against the
float32 model's on the same codes: mean KL(p_float32 || p_copy) in nats per code, the largest per-code KL, and
greedy agreement (the share of codes whose argmax is the same). The copies' kernels compute each row on its own
(checked: bit-identical to one row at a time), so a teacher-forced forward with the low-bit row limit lifted
computes what each sampling step computes. Sources: the official parity fixtures (tests/fixtures/official,
random weights converted from the official format, their codes), the bundled model on a captioned test split
(its held-out images encoded by its RQ-VAE, with their prompts and styles), any pipeline folder on codes it
samples itself in float32 (--weights), and the FFHQ-355M size (random weights, random codes). The bound a
default path must meet: mean KL <= KL_BOUND.

Also, from the float32 distributions: the mean probability of the likeliest code per depth, and the mean over
positions of its least value across depths: a bound on how often speculative (Jacobi-style) decoding, with the
acceptance rule that keeps sampling exact, can accept a guessed stack of D codes for the next position (its
spatial input), whatever the guess.

Speed: seconds to sample one image (batch 1, one thread, median of 3) with each copy, at the bundled model's
size and at the FFHQ-355M size.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.common import emit, paired_times, parse_args, rnd, run_main, with_goal
from rqtransformer import cpu_weights

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "official"
BUNDLED = ROOT / "weights" / "emoji-64"
COPIES = ("float16", "int8", "int4")
KL_BOUND = 0.01  # nats per code: the most a default path may lose against float32
BATCH = 64       # images per teacher-forced forward


@torch.inference_mode()
def compare(reference, copy, batches) -> dict:
    """Teacher-forced distributions of copy against reference over batches of (codes, kwargs)."""
    kl_sum, kl_max, same, n, top, stack = 0.0, 0.0, 0, 0, None, 0.0
    for codes, kwargs in batches:
        ref = reference(codes, **kwargs).float().log_softmax(-1)  # [B, h, w, D, K]
        with cpu_weights.low_bit_every_row():
            got = copy(codes, **kwargs).float().log_softmax(-1)
        kl = (ref.exp() * (ref - got)).sum(-1).clamp_(min=0)  # [B, h, w, D] (rounding can dip below 0)
        kl_sum, kl_max, n = kl_sum + float(kl.sum()), max(kl_max, float(kl.max())), n + kl.numel()
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        likeliest = ref.exp().amax(-1)  # [B, h, w, D]: the likeliest code's probability
        top = likeliest.flatten(0, 2).sum(0) if top is None else top + likeliest.flatten(0, 2).sum(0)  # [D]
        stack += float(likeliest.amin(-1).sum())  # a guessed stack is right at most this often
    return {"mean_kl_nats": rnd(kl_sum / n, 3), "max_kl_nats": rnd(kl_max, 3), "greedy_agreement": rnd(same / n, 5),
            "codes": n, "likeliest_code_probability_per_depth": [rnd(float(t) * top.numel() / n, 3) for t in top],
            "guessed_stack_acceptance_bound": rnd(stack * top.numel() / n, 3)}


def fidelity_records(name: str, model, batches, default: str | None = None) -> list[dict]:
    records = []
    for weights in COPIES:
        try:
            copy = model.quantized_for_cpu(weights)
        except ValueError as e:
            records.append(emit({"figure": "cpu_weights_fidelity", "model": name, "weights": weights,
                                 "skipped": str(e)}))
            continue
        r = {"figure": "cpu_weights_fidelity", "model": name, "weights": weights, **compare(model, copy, batches),
             "default_here": weights == default}
        records.append(emit(with_goal(r, f"mean KL <= {KL_BOUND} nats per code", r["mean_kl_nats"] <= KL_BOUND)))
    return records


def official_fixture_batches():
    """(name, float32 transformer, [(codes, kwargs)]) of each official fixture, converted here."""
    from safetensors.torch import load_file

    from official.convert import main as convert
    from pipelines import EXACT_CPU, RQPipeline

    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("uncond", "class", "text"):
            args = ["--rqvae", str(FIXTURES / "stage1"), "--rqtransformer", str(FIXTURES / kind),
                    "--output_dir", f"{tmp}/{kind}"]
            if kind == "text":
                args += ["--tokenizer", str(FIXTURES / "text" / "tokenizer")]
            convert(args)
            tf = RQPipeline.from_pretrained(f"{tmp}/{kind}", device="cpu", **EXACT_CPU).transformer
            ref = load_file(str(FIXTURES / kind / "expected.safetensors"))
            cond = {"uncond": {}, "class": {"class_labels": ref["cond"].long()},
                    "text": {"text_tokens": ref["cond"].long()}}[kind]
            yield f"official_fixture_{kind}", tf, [(ref["codes"].long(), cond)]


def bundled_batches(data_dir: str):
    """The bundled model (float32 from its float16 file) and its test split's codes, prompts and styles."""
    from evaluation.text import load_split
    from pipelines import EXACT_CPU, RQPipeline

    pipe = RQPipeline.from_pretrained(BUNDLED, device="cpu", **EXACT_CPU)
    test = load_split(data_dir, pipe.rqvae.config.resolution, pipe)
    rows = test.held_out("emoji") + test.held_out("pair") or list(range(len(test.ds)))
    batches = []
    with torch.inference_mode():
        for i in range(0, len(rows), BATCH):
            part = rows[i:i + BATCH]
            codes = pipe.rqvae.encode(torch.stack([test.ds[j][0] for j in part]))  # [B, h, w, D]
            text = pipe.transformer.tokenizer.encode([test.names[j] for j in part],
                                                     pipe.transformer.config.max_text_len)[0]
            batches.append((codes, {"class_labels": test.styles[part], "text_tokens": text}))
    return pipe.transformer, batches


def sampled_batches(weights: str, samples: int):
    """A pipeline folder's (or official:NAME's) float32 transformer and codes it sampled itself with the
    pipeline's defaults (seed i, class i % classes, the model's example prompts in turn): on a model's own samples
    the KL is the fidelity of sampling from it, for models whose training images are not at hand."""
    from evaluation.evaluate_fid import resolve
    from pipelines import EXACT_CPU, RQPipeline

    pipe = RQPipeline.from_pretrained(resolve(weights, None), device="cpu", **EXACT_CPU)
    tf, batches = pipe.transformer, []
    for i in range(samples):
        labels = [i % len(pipe.class_names)] if pipe.class_names else None
        prompt = pipe.prompts[i % len(pipe.prompts)] if pipe.has_text and pipe.prompts else None
        out = pipe(labels, prompt=prompt, num_images=1, generator=torch.Generator().manual_seed(i), output_type="pt")
        kwargs = {"class_labels": torch.tensor(out.class_labels)} if out.class_labels else {}
        if prompt is not None:
            kwargs["text_tokens"] = tf.tokenizer.encode([prompt], tf.config.max_text_len)[0]
        batches.append((out.codes, kwargs))
    return tf, batches


def ffhq_size(quick: bool):
    from bench.paper_size import QUICK_TRANSFORMER, FFHQ_TRANSFORMER
    from rqtransformer import RQTransformer, RQTransformerConfig

    torch.manual_seed(0)
    c = RQTransformerConfig(**(QUICK_TRANSFORMER if quick else FFHQ_TRANSFORMER))
    return RQTransformer(c).eval(), c


def speed_records(name: str, model) -> list[dict]:
    """Seconds per image with each copy, timed in alternating rounds (paired_times)."""
    records, fns = [], {}
    for weights in ("float32", *COPIES):
        try:
            m = model if weights == "float32" else model.quantized_for_cpu(weights)
        except ValueError as e:
            records.append(emit({"figure": "cpu_weights_seconds_per_image", "model": name, "weights": weights,
                                 "skipped": str(e)}))
            continue
        fns[weights] = lambda m=m: m.generate(num_samples=1, generator=torch.Generator().manual_seed(0))
    times = paired_times(fns)
    for weights, t in times.items():
        records.append(emit({"figure": "cpu_weights_seconds_per_image", "model": name, "weights": weights,
                             "batch": 1, "threads": 1, **t, "seconds": rnd(t["seconds"]),
                             "speedup_over_float32": rnd(times["float32"]["seconds"] / t["seconds"])}))
    return records


def figures(quick: bool, data_dir: str | None = None, weights: str | None = None, samples: int = 8) -> list[dict]:
    out = []
    for name, tf, batches in official_fixture_batches():
        out += fidelity_records(name, tf, batches, cpu_weights.default_cpu_weights(tf))
    if data_dir:
        tf, batches = bundled_batches(data_dir)
        out += fidelity_records("bundled_heldout", tf, batches[:1] if quick else batches,
                                cpu_weights.default_cpu_weights(tf))
        out += speed_records("bundled", tf)
    else:
        out.append(emit({"figure": "cpu_weights_fidelity", "model": "bundled_heldout",
                         "skipped": "no --data_dir (a captioned test split, python -m emoji_data.build)"}))
    if weights:
        tf, batches = sampled_batches(weights, samples)
        out += fidelity_records(f"{weights} (its own samples)", tf, batches, cpu_weights.default_cpu_weights(tf))
        out += speed_records(weights, tf)
    model, c = ffhq_size(quick)
    h, w, D = c.code_shape
    codes = torch.randint(0, c.codebook_size, (2, h, w, D), generator=torch.Generator().manual_seed(1))
    out += fidelity_records("ffhq_355m_random", model, [(codes, {})], cpu_weights.default_cpu_weights(model))
    return out + speed_records("ffhq_355m_random", model)


def main(argv=None) -> list[dict]:
    def extra(p):
        p.add_argument("--data_dir", default=None, help="a captioned test split of the emoji data (emoji_data.build's "
                                                        "test/): the bundled model's held-out codes")
        p.add_argument("--weights", default=None, help="also a pipeline folder or official:NAME, on codes it samples")
        p.add_argument("--samples", type=int, default=8, help="with --weights: how many images it samples (8)")
    args = parse_args(__doc__.splitlines()[0], argv, extra)
    if args.samples < 1:
        raise SystemExit(f"--samples must be at least 1, got {args.samples}")
    return run_main(lambda quick: figures(quick, args.data_dir, args.weights, args.samples), args)


if __name__ == "__main__":
    main()

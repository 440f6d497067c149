"""The paper's sizes on this machine: one 256-px image at the FFHQ-355M configuration (our models in the
official layout, random weights), sampling and decoding timed apart; and, given official-format checkpoints,
the peak memory of converting them and of loading the result and sampling one image.

    python -m bench.paper_size                     # timing: float32 and the CPU default (CUDA: float32 + bf16)
    python -m bench.paper_size --official DIR      # also memory: DIR/stage1 and DIR/stage2 in the official
                                                   # format (tests/fixtures/official/make_fixtures.py --paper)
    python -m bench.paper_size --quick             # tiny sizes: checks the script

Timing: sampling with float32 weights and with the CPU's default weights (RQPipeline's cpu_weights="auto"),
decoding in float32 and, where the CPU multiplies bf16 natively, in bfloat16 autocast (cpu_decoder="auto"),
with the PSNR of its images against float32's. One process, warm-up excluded, median of 3 (1 for batch 4 on a
CPU: a minute each);
memory in fresh subprocesses, peak RSS (VmHWM) against the weights' bytes on disk, beside the RSS of the
same imports with no weights (the interpreter with torch's libraries), which no model can avoid.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit, median_time, parse_args, rnd, run_main, with_goal

ROOT = Path(__file__).resolve().parents[1]
# the FFHQ-355M release (official configs/ffhq): our config fields that reproduce its layout
FFHQ_RQVAE = dict(resolution=256, codebook_size=2048, code_depth=4, downsample=32, channels=128,
                  channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, latent_dim=256, attn_resolutions=(16,),
                  pad_downsample=True, decoder_extra_block=True, upsample_keeps_width=True, quant_convs=True,
                  kmeans_init=False, quantize_dropout=False)
FFHQ_TRANSFORMER = dict(codebook_size=2048, code_shape=(8, 8, 4), dim=1024, heads=16, spatial_layers=24,
                        depth_layers=4, num_classes=0, dropout=0.0, cumsum_depth_emb=True, spatial_norm=False)
QUICK_RQVAE = dict(FFHQ_RQVAE, resolution=32, downsample=8, channels=32, channel_mult=(1, 1, 1, 1),
                   num_res_blocks=1, latent_dim=16, codebook_size=64, attn_resolutions=(8,))
QUICK_TRANSFORMER = dict(FFHQ_TRANSFORMER, codebook_size=64, code_shape=(4, 4, 4), dim=32, heads=2,
                         spatial_layers=2, depth_layers=1)


def build(quick: bool, device: torch.device):
    from pipelines import RQPipeline
    from rqtransformer import RQTransformer, RQTransformerConfig
    from rqvae import RQVAE, RQVAEConfig

    torch.manual_seed(0)
    vae = RQVAE(RQVAEConfig(**(QUICK_RQVAE if quick else FFHQ_RQVAE)))  # kmeans_init off: a random codebook
    transformer = RQTransformer(RQTransformerConfig(**(QUICK_TRANSFORMER if quick else FFHQ_TRANSFORMER)))
    return RQPipeline(vae, transformer, max_images=4).to(device)


def variants(pipe, device: torch.device) -> dict:
    """{name: transformer}: CPU: float32 and the default CPU weights (RQPipeline's cpu_weights="auto");
    CUDA: float32, then bfloat16 (the same model converted, so it comes last)."""
    from rqtransformer.cpu_weights import default_cpu_weights

    models = {"float32": pipe.transformer}
    if device.type == "cpu":
        weights = default_cpu_weights(pipe.transformer)
        try:
            models[f"{weights}_weights"] = pipe.transformer.quantized_for_cpu(weights)
        except ValueError as e:
            emit({"figure": "paper_sampling", "note": f"float32 only: no {weights} weights here ({e})"})
    elif torch.cuda.is_bf16_supported():
        models["bfloat16"] = None  # converted when its turn comes
    return models


def decoding_figures(pipe, codes: torch.Tensor, device: torch.device, quick: bool) -> list[dict]:
    """The decoder in float32 and, on CPUs with native bf16, in bfloat16 autocast (cpu_decoder="auto"):
    seconds and the PSNR of its images against float32's."""
    from rqcore.machine import native_bf16

    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cpu" and native_bf16() else [])
    out, exact, base = [], None, None
    for dtype in dtypes:
        pipe.rqvae.cpu_decode_dtype = dtype

        def decode(c=codes):
            with torch.inference_mode():
                images = pipe.rqvae.decode(c)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return images

        t, images = median_time(decode, 3), decode()
        exact, base = (images, t["seconds"]) if exact is None else (exact, base)
        mse = float((images - exact).pow(2).mean())
        out.append(emit({"figure": "paper_decoding", "config": "quick" if quick else "ffhq-355m",
                         "device": device.type, "decoder": str(dtype).removeprefix("torch."), "batch": len(codes),
                         "seconds": rnd(t["seconds"]), "float32_over_this": rnd(base / t["seconds"]),
                         "psnr_db_vs_float32": rnd(10 * math.log10(4 / mse), 3) if mse else None,
                         "threads": torch.get_num_threads()}))
    pipe.rqvae.cpu_decode_dtype = torch.float32
    return out


def timing_figures(quick: bool, device: torch.device | None = None) -> list[dict]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = build(quick, device)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    out, models = [], variants(pipe, device)
    for name, model in models.items():
        model = pipe.transformer.to(torch.bfloat16) if name == "bfloat16" else model
        default = name == list(models)[-1]  # batch 4 and the decoder only for the fastest path (a CPU minute)
        for batch in (1, 4) if default else (1,):
            g = torch.Generator(device).manual_seed(0)
            codes = model.generate(num_samples=batch, generator=g)  # warm-up, and the codes decoded below
            repeats = 1 if device.type == "cpu" and batch > 1 and not quick else 3

            def sample(b=batch):
                model.generate(num_samples=b, generator=torch.Generator(device).manual_seed(0))
                if device.type == "cuda":
                    torch.cuda.synchronize()

            s = median_time(sample, repeats, warmup=0)
            rec = {"figure": "paper_sampling", "config": "quick" if quick else "ffhq-355m", "device": device.type,
                   "variant": name, "batch": batch, "transformer_parameters": params,
                   "resolution": pipe.resolution, "sampling_seconds": rnd(s["seconds"]), "repeats": repeats,
                   "threads": torch.get_num_threads()}
            if default:
                decoders = decoding_figures(pipe, codes.long(), device, quick)
                fastest = min(d["seconds"] for d in decoders)
                rec.update(decoding_seconds=rnd(fastest), seconds_per_image=rnd((s["seconds"] + fastest) / batch))
            out += [emit(with_goal(rec, None, None))] + (decoders if default else [])
    return out


PROBE = """
import json, sys
sys.path.insert(0, {root!r})
{body}
print(json.dumps({{"peak_mib": next(int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                                    if l.startswith("VmHWM:"))}}))
"""
IMPORTS = "import torch, pipelines, official.convert"


def peak_mib(body: str) -> float:
    """Peak RSS (MiB) of a fresh interpreter running body."""
    code = PROBE.format(root=str(ROOT), body=f"{IMPORTS}\n{body}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def mib(*files: Path) -> float:
    return sum(f.stat().st_size for f in files) / 2**20


def memory_figures(official: Path) -> list[dict]:
    """Peak RSS of converting official/stage1 + stage2, and of loading the result and sampling one image."""
    baseline = peak_mib("pass")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "converted"
        args = ["--rqvae", str(official / "stage1"), "--rqtransformer", str(official / "stage2"),
                "--output_dir", str(out)]
        t0 = time.perf_counter()
        convert = peak_mib(f"official.convert.main({args!r})")
        seconds = time.perf_counter() - t0
        source = mib(official / "stage1" / "model.pt", official / "stage2" / "model.pt")
        weights = mib(*out.glob("*/model.safetensors"))
        sample = peak_mib(f"p = pipelines.RQPipeline.from_pretrained({str(out)!r}, device='cpu')\n"
                          "import torch; p(num_images=1, generator=torch.Generator().manual_seed(0))")
    recs = [{"figure": "paper_memory", "step": "convert", "peak_mib": rnd(convert), "weights_mib": rnd(source),
             "ratio": rnd(convert / source, 3), "ratio_above_imports": rnd((convert - baseline) / source, 3),
             "imports_mib": rnd(baseline), "seconds": rnd(seconds)},
            {"figure": "paper_memory", "step": "load_and_sample_1", "peak_mib": rnd(sample),
             "weights_mib": rnd(weights), "ratio": rnd(sample / weights, 3),
             "ratio_above_imports": rnd((sample - baseline) / weights, 3), "imports_mib": rnd(baseline)}]
    return [emit(with_goal({**r, "source": official.name}, "peak RSS <= 1.3x the weights on disk",
                           r["ratio"] <= 1.3)) for r in recs]


def figures(quick: bool, official: str | None = None) -> list[dict]:
    out = timing_figures(quick)
    if official:
        out += memory_figures(Path(official))
    else:
        emit({"figure": "paper_memory", "skipped": "give --official DIR (stage1/ and stage2/ in the official format)"})
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(__doc__.splitlines()[0], argv, lambda p: p.add_argument("--official", default=None))
    return run_main(lambda quick: figures(quick, args.official), args)


if __name__ == "__main__":
    main()

"""The official RQ-VAE / RQ-Transformer release format (kakaobrain/rq-vae-transformer) -> our configs and tensors.

A released run is `stage1/{model.pt, config.yaml}` and `stage2/{model.pt, config.yaml}`. `model.pt` is a
pickle: it is read only here, only with `torch.load(weights_only=True)` (which refuses any object that could
run code), and only its tensors are kept. `config.yaml` is read with a safe YAML loader.

What differs from our layout, and how each difference maps (the details are in the functions below):
- stage 1: the official layout is our RQVAEConfig with attn_resolutions, pad_downsample, decoder_extra_block,
  upsample_keeps_width and quant_convs set; q/k/v convs are concatenated into one; the codebook's padding
  row (index K) is dropped and its EMA buffers become the quantizer library's.
- stage 2: a code's input embedding is input_mlp(codebook row), so `code_emb = E W^T + b` is folded from
  both checkpoints; the depth input is head_mlp(sum of the earlier depths' codebook rows), which becomes
  `depth_code_emb = E W_h^T` (summed by cumsum_depth_emb) with the bias folded into depth positions 1..D-1.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import yaml

from rqtransformer.model import RQTransformerConfig
from rqvae.model import RQVAEConfig

LICENCE = "CC-BY-NC-SA 4.0 (non-commercial)"
SOURCE = "kakaobrain/rq-vae-transformer"
STAGE2_DROPPED = ("cond_classifier.",)  # text models' next-text-token head: not used for sampling images


def read_yaml(folder: Path) -> dict:
    """config.yaml of a released stage folder, by a safe loader (no Python tags)."""
    file = Path(folder) / "config.yaml"
    if not file.is_file():
        raise ValueError(f"{folder} has no config.yaml (expected model.pt beside config.yaml, as in the tarballs)")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{file} is not plain YAML ({first}): refused") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text") from None
    if not isinstance(data, dict) or not isinstance(data.get("arch"), dict):
        raise ValueError(f"{file} has no 'arch' section: not a config of the official code")
    return data


def _load(file: Path, mmap: bool):
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the load below says what matters
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises pickle's UnpicklingError, RuntimeError, EOFError...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if mmap and "mmap" in first:
            return None  # an old-format file: read it whole
        if "weights_only" in str(e) or type(e).__name__ == "UnpicklingError":
            what = re.search(r"Unsupported [^.\n]*", str(e))  # e.g. "Unsupported global: GLOBAL posix.system"
            raise ValueError(f"{file} holds objects a weights-only load refuses, so it was not read"
                             + (f" ({what.group(0)[:160]})" if what else "")) from None
        raise ValueError(f"{file} is not a readable PyTorch checkpoint ({first[:160]})") from None


def read_state(folder: Path, ema: bool = False, fallback: bool = False) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of model.pt's `state_dict` (`state_dict_ema` with ema; its `state_dict` if it has none and
    fallback), read without running any code -> (tensors, whether they are the EMA ones).

    Memory: the file is first memory-mapped to see what it holds. When the chosen weights are most of it, it is
    read into memory instead, so that each tensor is freed once converted (converting pops them; mapped pages
    would stay resident until the end); otherwise (optimizer state beside them) only the weights are touched."""
    file = Path(folder) / "model.pt"
    if not file.is_file():
        raise ValueError(f"{folder} has no model.pt")
    data = _load(file, mmap=True)
    for attempt in range(2):
        if data is None:
            data = _load(file, mmap=False)
        use_ema = ema and isinstance(data, dict) and ("state_dict_ema" in data or not fallback)
        key = "state_dict_ema" if use_ema else "state_dict"
        if not isinstance(data, dict) or key not in data:
            have = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{file} has no '{key}' (it has {have})" + ("; drop --ema" if ema else ""))
        state = data[key]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{file}: '{key}' is not a mapping of names to tensors")
        weights = sum(v.untyped_storage().nbytes() for v in state.values())
        if attempt or weights < 0.9 * file.stat().st_size:
            break
        data = None  # mostly these weights: read them whole (freed one by one as they are converted)
    return {str(k).removeprefix("module."): v for k, v in state.items()}, use_ema


def _get(section: dict, key: str, where: str):
    if not isinstance(section, dict) or key not in section:
        raise ValueError(f"config.yaml: {where} has no '{key}'")
    return section[key]


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"config.yaml: {message}: this layout is not supported by the converter")


def _taker(official: dict[str, torch.Tensor], stage: str):
    """take(key): the official tensor, popped (each is used once, then only ours holds it), or one line."""
    def take(key: str) -> torch.Tensor:
        if key not in official:
            raise ValueError(f"{stage} model.pt has no tensor '{key}', which config.yaml's layout needs")
        return official.pop(key)
    return take


# ---- stage 1 --------------------------------------------------------------------------------------------

def rqvae_config(data: dict) -> RQVAEConfig:
    arch = data["arch"]
    _need(arch.get("type") == "rq-vae", f"arch.type is {arch.get('type')!r}, not 'rq-vae' (is this stage 1?)")
    hp, dd = _get(arch, "hparams", "arch"), _get(arch, "ddconfig", "arch")
    _need(hp.get("bottleneck_type", "rq") == "rq", "bottleneck_type is not 'rq'")
    _need(bool(hp.get("shared_codebook")), "separate codebooks per depth (shared_codebook false)")
    latent, code = list(_get(hp, "latent_shape", "hparams")), list(_get(hp, "code_shape", "hparams"))
    _need(latent[:2] == code[:2], f"latent_shape {latent} regrouped into code_shape {code}")
    _need(not dd.get("double_z", False) and dd.get("resamp_with_conv", True), "double_z or resampling without convs")
    mult, ch = list(_get(dd, "ch_mult", "ddconfig")), int(_get(dd, "ch", "ddconfig"))
    _need(mult[0] == 1, f"ch_mult {mult} does not start with 1")
    _need(all(ch * m % 32 == 0 for m in mult), f"widths {[ch * m for m in mult]} are not multiples of 32 "
          "(its GroupNorm has 32 groups)")
    _need(dd.get("in_channels", 3) == dd.get("out_ch", 3), "in_channels differs from out_ch")
    embed_dim = int(_get(hp, "embed_dim", "hparams"))
    _need(latent[2] == embed_dim, f"latent_shape {latent} does not end with embed_dim {embed_dim}")
    try:
        return RQVAEConfig(
            resolution=int(_get(dd, "resolution", "ddconfig")), codebook_size=int(_get(hp, "n_embed", "hparams")),
            code_depth=int(code[2]), downsample=2 ** (len(mult) - 1), in_channels=int(dd.get("in_channels", 3)),
            channels=ch, channel_mult=tuple(mult), num_res_blocks=int(_get(dd, "num_res_blocks", "ddconfig")),
            mid_attention=True, latent_dim=embed_dim, commitment_weight=float(hp.get("latent_loss_weight", 0.25)),
            ema_decay=float(hp.get("decay", 0.99)), kmeans_init=False,  # trained codebook: never re-initialised
            threshold_ema_dead_code=1.0 if hp.get("restart_unused_codes", False) else 0.0,
            quantize_dropout=False, attn_resolutions=tuple(dd.get("attn_resolutions", ())), pad_downsample=True,
            decoder_extra_block=True, upsample_keeps_width=True, quant_convs=True,
            z_channels=int(_get(dd, "z_channels", "ddconfig")))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.yaml: {e}") from None


def _stage1_modules(model, c: RQVAEConfig) -> list[tuple[str, str, torch.nn.Module]]:
    """(our prefix, official prefix, our module) for every module with weights, in the same order."""
    from rqvae.model import AttnBlock, ResBlock

    enc = ["encoder.conv_in"]
    res = c.resolution
    for i in range(len(c.channel_mult)):
        for b in range(c.num_res_blocks):
            enc.append(f"encoder.down.{i}.block.{b}")
            if res in c.attn_resolutions:
                enc.append(f"encoder.down.{i}.attn.{b}")
        if i < len(c.channel_mult) - 1:
            enc.append(f"encoder.down.{i}.downsample")
            res //= 2
    enc += ["encoder.mid.block_1", "encoder.mid.attn_1", "encoder.mid.block_2",
            "encoder.norm_out", "encoder.conv_out", "quant_conv"]
    dec = ["post_quant_conv", "decoder.conv_in", "decoder.mid.block_1",
           "decoder.mid.attn_1", "decoder.mid.block_2"]
    for i in reversed(range(len(c.channel_mult))):
        for b in range(c.num_res_blocks + 1):
            dec.append(f"decoder.up.{i}.block.{b}")
            if res in c.attn_resolutions:
                dec.append(f"decoder.up.{i}.attn.{b}")
        if i:
            dec.append(f"decoder.up.{i}.upsample.conv")
            res *= 2
    dec.append("decoder.norm_out")
    ours = [(f"encoder.net.{j}", m) for j, m in enumerate(model.encoder.net) if any(True for _ in m.parameters())]
    ours += [(f"decoder.net.{j}", m) for j, m in enumerate(model.decoder.net) if any(True for _ in m.parameters())]
    theirs = enc + dec
    assert len(ours) == len(theirs), "the official layout and RQVAEConfig's disagree"  # a bug of ours, not input
    pairs = [(o, t, m) for (o, m), t in zip(ours, theirs)]
    for o, t, m in pairs:  # block kinds must line up too
        assert isinstance(m, ResBlock) == (".block" in t), (o, t)
        assert isinstance(m, AttnBlock) == (".attn" in t), (o, t)
    return pairs + [("decoder.conv_out", "decoder.conv_out", model.decoder.conv_out)]


def rqvae_state(model, c: RQVAEConfig, official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our RQVAE state_dict from the official stage-1 tensors, popped from `official` as they are used (every one
    must be, or one line says why not)."""
    from rqvae.model import AttnBlock, ResBlock

    out, take = {}, _taker(official, "stage 1")
    for ours, theirs, module in _stage1_modules(model, c):
        if isinstance(module, AttnBlock):
            for p in ("weight", "bias"):
                out[f"{ours}.norm.{p}"] = take(f"{theirs}.norm.{p}")
                out[f"{ours}.qkv.{p}"] = torch.cat([take(f"{theirs}.{n}.{p}") for n in "qkv"])
                out[f"{ours}.proj.{p}"] = take(f"{theirs}.proj_out.{p}")
            continue
        for name, _ in module.named_parameters():
            src = name.replace("skip.", "nin_shortcut.") if isinstance(module, ResBlock) else name
            out[f"{ours}.{name}"] = take(f"{theirs}.{src}")
    K, D = c.codebook_size, c.code_depth
    book = take("quantizer.codebooks.0.weight")  # [K + 1, C]: row K is the padding row
    if book.shape[0] != K + 1:
        raise ValueError(f"stage 1 codebook has {book.shape[0] - 1} codes, config.yaml says n_embed {K}")
    size, avg = take("quantizer.codebooks.0.cluster_size_ema"), take("quantizer.codebooks.0.embed_ema")
    first = {"weight": book, "cluster_size_ema": size, "embed_ema": avg}
    for d in range(D):  # one shared codebook, stored once per depth in the official file
        for n in ("weight", "cluster_size_ema", "embed_ema"):
            key = f"quantizer.codebooks.{d}.{n}"
            if d and key in official and not torch.equal(official.pop(key), first[n]):
                raise ValueError(f"stage 1 '{key}' differs from depth 0's: the codebook is not shared")
        q = f"quantizer.layers.{d}._codebook"
        out[f"{q}.embed"], out[f"{q}.embed_avg"] = book[:K][None], avg[None]
        out[f"{q}.cluster_size"], out[f"{q}.initted"] = size[None], torch.tensor(True)
    extra = sorted(official)
    if extra:
        raise ValueError(f"stage 1 model.pt has tensors config.yaml's layout does not use: {extra[:5]}"
                         + (" ..." if len(extra) > 5 else ""))
    return out


# ---- stage 2 --------------------------------------------------------------------------------------------

def sampling_settings(data: dict) -> dict:
    """experiment.sample's top_k / top_p (one value or a list per depth), None where not given."""
    sample = (data.get("experiment") or {}).get("sample") or {}
    return {k: sample.get(k) for k in ("top_k", "top_p")}


def transformer_config(data: dict, vae: RQVAEConfig, class_names: list[str] | None = None) -> RQTransformerConfig:
    arch, dataset = data["arch"], data.get("dataset") or {}
    _need(arch.get("type") == "rq-transformer", f"arch.type is {arch.get('type')!r}, not 'rq-transformer' "
          "(is this stage 2?)")
    K = arch.get("vocab_size", dataset.get("vocab_size"))
    Ks = K if isinstance(K, list) else [K]
    if K is None or any(k != vae.codebook_size for k in Ks):
        raise ValueError(f"stage 2 expects codes from a codebook of {K}, the stage-1 checkpoint has "
                         f"{vae.codebook_size}: this stage 2 belongs to another stage 1")
    block = list(_get(arch, "block_size", "arch"))
    if tuple(block) != vae.code_shape:
        raise ValueError(f"stage 2 expects codes of shape {tuple(block)}, the stage-1 checkpoint makes "
                         f"{vae.code_shape}: this stage 2 belongs to another stage 1")
    width = arch.get("input_embed_dim") or vae.latent_dim
    if width != vae.latent_dim:
        raise ValueError(f"stage 2 embeds codebook rows of width {width}, the stage-1 codebook's is "
                         f"{vae.latent_dim}: this stage 2 belongs to another stage 1")
    _need(arch.get("shared_tok_emb") and arch.get("shared_cls_emb"), "per-depth embeddings or heads "
          "(shared_tok_emb / shared_cls_emb false)")
    vq_in, vq_head = bool(arch.get("input_emb_vqvae")), bool(arch.get("head_emb_vqvae"))
    _need(vq_in == vq_head and (not vq_head or arch.get("cumsum_depth_ctx")), "input_emb_vqvae, head_emb_vqvae "
          "and cumsum_depth_ctx not all on (or all off)")
    _need(not arch.get("scaled_head_emb_vqvae") and not arch.get("use_padding_emb"), "scaled or padding embeddings")
    body, head = _get(arch, "body", "arch"), _get(arch, "head", "arch")
    blocks = [_get(s, "block", "body/head") for s in (body, head)]
    _need(blocks[0].get("n_head") == blocks[1].get("n_head"), "body and head with different n_head")
    _need(all(b.get("gelu", "v1") == "v1" and b.get("attn_bias", True) and b.get("mlp_bias", True) for b in blocks),
          "a GELU other than v1 or layers without biases")
    cond_vocab, cond_len = max(int(arch.get("vocab_size_cond", 0)), 1), max(int(arch.get("block_size_cond", 0)), 1)
    text = cond_len > 1
    num_classes = 0 if text or cond_vocab == 1 else cond_vocab
    names = list(class_names or []) if num_classes else []
    if names and len(names) != num_classes:
        names = []
    try:
        return RQTransformerConfig(
            codebook_size=vae.codebook_size, code_shape=tuple(block), dim=int(_get(arch, "embed_dim", "arch")),
            heads=int(blocks[0]["n_head"]), spatial_layers=int(_get(body, "n_layer", "body")),
            depth_layers=int(_get(head, "n_layer", "head")), num_classes=num_classes,
            dropout=float(blocks[0].get("resid_pdrop", 0.1)), class_names=names,
            text_vocab_size=cond_vocab if text else 0, max_text_len=cond_len if text else 0,
            cumsum_depth_emb=vq_head, spatial_norm=False, start_token=not text)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.yaml: {e}") from None


def transformer_state(c: RQTransformerConfig, official: dict[str, torch.Tensor],
                      codebook: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our RQTransformer state_dict from the official stage-2 tensors (popped from `official` as they are used,
    so that each is freed once converted) and the stage-1 codebook E [K, C]."""
    take = _taker(official, "stage 2")
    h, w, D = c.code_shape
    out = {}
    if c.cumsum_depth_emb:  # fold the MLPs of codebook rows into tables (float64, then rounded once)
        E = codebook.double()  # [K, C]
        w_in, b_in = take("input_mlp.weight").double(), take("input_mlp.bias").double()
        if w_in.shape[1] != E.shape[1]:
            raise ValueError(f"stage 2's input_mlp takes rows of width {w_in.shape[1]}, the stage-1 codebook's are "
                             f"{E.shape[1]} wide: this stage 2 belongs to another stage 1")
        out["code_emb.weight"] = (E @ w_in.T + b_in).float()  # [K, dim]
        out["depth_code_emb.weight"] = (E @ take("head_mlp.weight").double().T).float()
        depth_bias = take("head_mlp.bias")
    else:
        out["code_emb.weight"] = take("tok_emb.weight")
        depth_bias = None
    depth_pos = take("pos_emb_d")[0].clone()  # [D, dim]
    if depth_bias is not None:
        depth_pos[1:] += depth_bias  # the depth inputs d > 0 all pass through head_mlp's bias
    out["depth_pos"] = depth_pos
    cond, pos_cond, pos_hw = take("cond_emb.weight"), take("pos_emb_cond")[0], take("pos_emb_hw")[0]
    if c.start_token:  # position 0: the condition token and its position; then codes 0..h*w-2 at theirs
        null = torch.zeros(1, cond.shape[1], dtype=cond.dtype) if c.num_classes else cond.new_zeros(0, cond.shape[1])
        out["class_emb.weight"] = torch.cat([cond, null])  # the null class (a last row) was never trained
        out["spatial_pos"] = torch.cat([pos_cond[:1], pos_hw[: h * w - 1]])
    else:  # text first, no start token
        out["text_emb.weight"], out["text_pos"] = cond, pos_cond[: c.max_text_len]
        out["spatial_pos"] = pos_hw[: h * w - 1]
    for ours, theirs, n in (("spatial_blocks", "body_transformer", c.spatial_layers),
                            ("depth_blocks", "head_transformer", c.depth_layers)):
        for i in range(n):
            o, t = f"{ours}.{i}", f"{theirs}.blocks.{i}"
            for p in ("weight", "bias"):
                out[f"{o}.ln1.{p}"], out[f"{o}.ln2.{p}"] = take(f"{t}.ln1.{p}"), take(f"{t}.ln2.{p}")
                out[f"{o}.attn.qkv.{p}"] = torch.cat([take(f"{t}.attn.{x}.{p}") for x in ("query", "key", "value")])
                out[f"{o}.attn.proj.{p}"] = take(f"{t}.attn.proj.{p}")
                out[f"{o}.mlp.fc1.{p}"], out[f"{o}.mlp.fc2.{p}"] = take(f"{t}.mlp.0.{p}"), take(f"{t}.mlp.2.{p}")
    for p in ("weight", "bias"):
        out[f"depth_norm.{p}"], out[f"head.{p}"] = take(f"classifier.layer_norm.{p}"), take(f"classifier.linear.{p}")
    extra = sorted(k for k in official if not k.startswith(STAGE2_DROPPED))
    if extra:
        raise ValueError(f"stage 2 model.pt has tensors config.yaml's layout does not use: {extra[:5]}"
                         + (" ..." if len(extra) > 5 else ""))
    return out


def check_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor], stage: str) -> None:
    """One line naming the first tensor whose shape the config does not give (before load_state_dict)."""
    expected = model.state_dict()
    for key, t in state.items():
        if key in expected and tuple(t.shape) != tuple(expected[key].shape):
            raise ValueError(f"{stage} tensor for '{key}' has shape {tuple(t.shape)}, config.yaml gives "
                             f"{tuple(expected[key].shape)}: the weights do not match their config")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{stage}: no official tensor maps to {missing[:5]}")


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names in index order, from torchvision's weights metadata (nothing downloaded)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


TOKENIZER_FILES = {"bpe16k_huggingface": "bpe-16k", "bpe30k_huggingface": "bpe-30k"}  # txt_tok_name -> files


def text_tokenizer(folder: Path, data: dict, vocab_size: int):
    """Our PromptTokenizer giving exactly the official text encoder's ids: the CharBPE files of `folder`,
    lower-cased, with [PAD] (id 0) added as the official code does; padding and truncation to the context
    length are PromptTokenizer.encode's."""
    from tokenizers import CharBPETokenizer

    from rqtransformer.tokenizer import PAD_TOKEN, TEXT_PAD_ID, PromptTokenizer

    name = (data.get("dataset") or {}).get("txt_tok_name", "bpe16k_huggingface")
    if name not in TOKENIZER_FILES:
        raise ValueError(f"config.yaml: txt_tok_name {name!r} is not supported (only {sorted(TOKENIZER_FILES)})")
    stem = Path(folder) / TOKENIZER_FILES[name]
    vocab, merges = stem.with_name(stem.name + "-vocab.json"), stem.with_name(stem.name + "-merges.txt")
    for file in (vocab, merges):
        if not file.is_file():
            raise ValueError(f"--tokenizer {folder}: no {file.name} (the official repository's "
                             "rqvae/txtimg_datasets/tokenizers/pretrained/ has it)")
    try:
        official = CharBPETokenizer.from_file(str(vocab), str(merges), unk_token="[UNK]", lowercase=True)
    except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
        raise ValueError(f"--tokenizer {folder}: unreadable BPE files ({str(e).splitlines()[0][:120]})") from None
    official.add_special_tokens([PAD_TOKEN])
    if official.token_to_id(PAD_TOKEN) != TEXT_PAD_ID:
        raise ValueError(f"--tokenizer {folder}: {PAD_TOKEN} is not id {TEXT_PAD_ID} in {vocab.name}")
    tokenizer = PromptTokenizer(official._tokenizer)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"--tokenizer {folder} has {tokenizer.vocab_size} tokens, stage 2 embeds {vocab_size}: "
                         "it belongs to another model")
    return tokenizer

"""RQPipeline: generation, streaming, reconstruction, completion, save/load and input checks."""
from __future__ import annotations

import json
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import EXACT_CPU, RQPipeline
from pipelines.streaming import SAMPLING_THREAD
from rqcore.images import to_pil
from rqtransformer import RQTransformer, RQTransformerConfig

from conftest import BUNDLED, CLASSES, gen, tiny_pipeline, tiny_text_pipeline


def test_generate_outputs(pipe):
    out = pipe("squares", num_images=3, generator=gen(0))
    assert len(out.images) == 3 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in out.images)
    assert out.codes.shape == (3, 4, 4, 2) and out.class_labels == [1, 1, 1]
    pt = pipe(["circles", 2], generator=gen(0), output_type="pt").images
    assert pt.shape == (2, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    arr = pipe(0, generator=gen(0), output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 3, 32, 32)


def test_same_seed_same_images_and_names_equal_indices(pipe):
    a = pipe("stars", num_images=2, generator=gen(5), guidance_scale=2.0, top_k=10)
    b = pipe(2, num_images=2, generator=gen(5), guidance_scale=2.0, top_k=10)
    assert torch.equal(a.codes, b.codes)
    assert [np.asarray(i).tolist() for i in a.images] == [np.asarray(i).tolist() for i in b.images]
    c = pipe(2, num_images=2, generator=gen(6), guidance_scale=2.0, top_k=10)
    assert not torch.equal(a.codes, c.codes)


def test_save_load_round_trip_reproduces_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"rqvae", "rqtransformer", "pipeline.json"}
    loaded = RQPipeline.from_pretrained(tmp_path / "p", device="cpu", **EXACT_CPU)
    assert loaded.class_names == CLASSES and loaded.max_images == 6
    a = pipe("circles", num_images=2, generator=gen(1), output_type="pt")
    b = loaded("circles", num_images=2, generator=gen(1), output_type="pt")
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.images, b.images)


def test_bfloat16_transformer_keeps_a_float32_rqvae(pipe, tmp_path):
    """dtype is the transformer's (the GPU option); sampling and decoding still work, here on CPU."""
    pipe.save_pretrained(tmp_path / "p")
    half = RQPipeline.from_pretrained(tmp_path / "p", device="cpu", dtype=torch.bfloat16)
    assert half.transformer.head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.rqvae.parameters())
    out = half("squares", num_images=2, generator=gen(0), guidance_scale=2.0, output_type="pt")
    assert out.codes.shape == (2, 4, 4, 2) and 0 <= int(out.codes.min()) and int(out.codes.max()) < 32
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="dtype"):
        RQPipeline.from_pretrained(tmp_path / "p", device="cpu", dtype=torch.int8)


def test_stream_yields_previews_then_the_same_final_images(pipe):
    items = list(pipe.stream("squares", num_images=2, generator=gen(3), guidance_scale=1.5, output_type="pt"))
    final = pipe("squares", num_images=2, generator=gen(3), guidance_scale=1.5, output_type="pt")
    previews, last = items[:-1], items[-1]
    assert len(previews) == 3  # after rows 1, 2, 3 of a 4x4 grid; the 4th row is the final image
    assert [p.done for p in previews] == [0.25, 0.5, 0.75] and last.done == 1.0
    assert torch.equal(last.codes, final.codes)
    torch.testing.assert_close(last.images, final.images)
    # first preview: top row decoded, rows below grey (0.5)
    first = previews[0]
    assert (first.codes[:, 1:] == -1).all() and (first.codes[:, 0] >= 0).all()
    assert torch.all(first.images[:, :, 8:] == 0.5)
    # the sampled rows of a preview are those of the final stack
    assert torch.equal(previews[1].codes[:, :2], final.codes[:, :2])


def test_preview_decodes_every_known_position_and_greys_the_rest(pipe):
    """Previews decode only the code rows down to the last known position (a completion's kept codes can
    sit in any row); every known cell shows its decoded pixels, every unknown one is grey."""
    f = pipe.rqvae.config.downsample
    codes = pipe("squares", num_images=2, generator=gen(4), output_type="pt").codes  # [2, 4, 4, D]
    partial = torch.full_like(codes, -1)
    partial[:, 0], partial[:, 2, 1] = codes[:, 0], codes[:, 2, 1]  # row 0, and one kept cell in row 2
    with torch.inference_mode():
        out = pipe._preview(partial, 5, {}, "pt")
    assert out.images.shape == (2, 3, 4 * f, 4 * f) and out.done == 5 / 16
    grey = out.images == 0.5
    assert grey[:, :, 3 * f:].all() and grey[:, :, f: 2 * f].all() and grey[:, :, 2 * f: 3 * f, :f].all()
    assert not grey[:, :, :f].all() and not grey[:, :, 2 * f: 3 * f, f: 2 * f].all()


def test_latest_only_stream_skips_previews_a_busy_consumer_missed(pipe):
    """The app's mode: sampling never waits for the consumer, and the previews it was too busy to take
    are replaced by newer ones (here by the final output); the images are those of a plain call."""
    final = pipe("squares", num_images=2, generator=gen(3), output_type="pt")
    stream = pipe.stream("squares", num_images=2, generator=gen(3), output_type="pt", latest_only=True)
    items = [next(stream)]
    for _ in range(1200):  # a busy consumer: the worker samples every row meanwhile, waiting for no one
        if SAMPLING_THREAD not in [t.name for t in threading.enumerate()]:
            break
        time.sleep(0.1)
    items += list(stream)
    assert [p.done for p in items][-1] == 1.0 and len(items) <= 2  # without latest_only: 4 items
    assert torch.equal(items[-1].codes, final.codes)
    torch.testing.assert_close(items[-1].images, final.images)
    closed = pipe.stream("squares", generator=gen(0), latest_only=True)
    next(closed)
    closed.close()
    assert SAMPLING_THREAD not in [t.name for t in threading.enumerate()]
    with pytest.raises(ValueError, match="latest_only must be True or False"):
        next(pipe.stream("squares", latest_only="yes"))


def test_min_interval_skips_previews_due_too_soon(pipe):
    """min_interval: the first preview always comes, later ones only after the interval, and the skipped ones
    are never decoded; the final output is that of a plain call."""
    final = pipe("squares", num_images=2, generator=gen(3), output_type="pt")
    for latest_only in (False, True):
        items = list(pipe.stream("squares", num_images=2, generator=gen(3), output_type="pt",
                                 latest_only=latest_only, min_interval=3600))
        assert [p.done for p in items] == [0.25, 1.0]  # only the first preview (after row 1), then the final
        assert torch.equal(items[-1].codes, final.codes)
    assert len(list(pipe.stream("squares", generator=gen(3), min_interval=0))) == 4  # 0: every row
    for bad in (-1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="min_interval must be a number of seconds >= 0"):
            next(pipe.stream("squares", min_interval=bad))


def test_num_images_repeats_one_label_and_must_match_several(pipe):
    assert pipe("stars").class_labels == [2]  # default: one image per label
    assert pipe("stars", num_images=3).class_labels == [2, 2, 2]
    assert pipe(["stars", 0]).class_labels == [2, 0] == pipe(["stars", 0], num_images=2).class_labels
    assert len(pipe().images) == 1 and len(pipe(num_images=3).images) == 3  # no label: unconditional
    for n in (1, 3):  # num_images=1 with several labels is a mistake too, not "use the first"
        with pytest.raises(ValueError, match=f"2 class labels but num_images={n}: give one label to repeat"):
            pipe(["stars", 0], num_images=n)
    with pytest.raises(ValueError, match="give 1 to 6 class labels, got 7"):
        pipe(["stars"] * 7)  # max_images holds for labels as for num_images


def test_labels_as_names_indices_arrays_and_tensors_sample_the_same(pipe):
    a = pipe(["stars", "circles"], generator=gen(2)).codes
    for labels in ([2, 0], np.array([2, 0]), torch.tensor([2, 0]), np.array(["stars", "circles"])):
        assert torch.equal(pipe(labels, generator=gen(2)).codes, a), labels
    with pytest.raises(ValueError, match=r"one name or index per image \(1-D\), got shape \(1, 2\)"):
        pipe(torch.tensor([[2, 0]]))
    with pytest.raises(ValueError, match="unknown class 'starz'; did you mean 'stars'"):
        pipe("starz")


def test_closing_a_stream_early_stops_the_sampling_thread(pipe):
    g = gen(0)
    stream = pipe.stream("squares", generator=g)
    assert next(stream).done == 0.25  # the first of 4 code rows
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(timeout=120)  # generous: fails only if closing hangs
    assert not closer.is_alive(), "closing the stream hangs"
    assert SAMPLING_THREAD not in [t.name for t in threading.enumerate()]
    full = gen(0)
    pipe("squares", generator=full)
    # the abandoned run drew fewer random numbers than a full one: sampling stopped before the last position
    assert not torch.equal(g.get_state(), full.get_state())


def test_reconstruction_error_falls_with_depth(image_dir, trained_tiny_vae):
    vae, _ = trained_tiny_vae
    tf = RQTransformer(RQTransformerConfig(codebook_size=16, code_shape=(2, 2, 2), dim=16, heads=2, spatial_layers=1,
                                           depth_layers=1, num_classes=0, dropout=0.0))
    p = RQPipeline(vae, tf)
    files = sorted(image_dir.rglob("*.png"))
    pil = Image.open(files[0])  # RGBA, 20x20: converted and resized
    rec = p.reconstruct(pil)
    assert len(rec.images) == 2 and rec.codes.shape == (2, 2, 2) and len(rec.psnr) == 2
    assert rec.input_image.size == rec.images[0].size == (16, 16)
    # PSNR rises with depth on the shipped model's held-out examples (a tiny model's second depth may not help)
    bundled = RQPipeline.from_pretrained(BUNDLED, device="cpu")
    psnr = np.array([bundled.reconstruct(Image.open(f)).psnr for f in sorted((BUNDLED / "examples").glob("*.png"))])
    assert psnr.shape == (6, 4) and (np.diff(psnr, axis=1) > 0.3).all(), psnr  # [image, depth]
    # unconditional models generate without labels and refuse them
    assert len(p(num_images=2, generator=gen(0)).images) == 2
    with pytest.raises(ValueError, match="unconditional"):
        p("circles")


def test_complete_keeps_unmasked_codes_exactly_and_returns_its_keep_mask_and_input(pipe):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    mask = np.zeros((40, 40), np.uint8)
    mask[:10, :10] = 255  # top-left quarter of the (resized) image -> code position (0, 0) only
    out = pipe.complete(image, Image.fromarray(mask), class_labels="stars", num_images=2, generator=gen(0))
    keep = out.keep_mask  # [h,w], True = kept
    assert keep.dtype == torch.bool and keep.shape == (4, 4) and keep.sum() == 15 and not keep[0, 0]
    assert torch.equal(keep, pipe.mask_to_keep(Image.fromarray(mask)))
    model_input = pipe.preprocess(image)  # [1,3,32,32]
    assert np.array_equal(np.asarray(out.input_image), np.asarray(to_pil(model_input)[0]))
    original = pipe.rqvae.encode(model_input)  # [1,4,4,2]
    assert torch.equal(out.codes[:, keep], original[:, keep].cpu().expand(2, -1, -1))
    assert len(out.images) == 2 and out.class_labels == [2, 2]
    assert pipe(num_images=1).keep_mask is None  # only completion has one


def test_complete_checks_the_image_first_then_the_mask(pipe):
    with pytest.raises(ValueError, match="expected a PIL image"):
        pipe.complete("not an image", np.zeros((2, 3, 32, 32), np.uint8))  # both bad: the image is reported
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="single-channel"):
        pipe.complete(image, np.zeros((2, 3, 32, 32), np.uint8), class_labels="unicorns")
    with pytest.raises(ValueError, match="complete takes one image, got 2"):
        pipe.complete([image, image], np.ones((32, 32)))


def test_mask_maps_any_touched_position(pipe):
    mask = np.zeros((32, 32), np.uint8)
    mask[7, 8] = 255  # one pixel straddling positions (0,1)
    keep = pipe.mask_to_keep(mask)
    assert (~keep).sum() == 1 and not keep[0, 1]
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (24, 24, 32, 32))  # a brush stroke on a transparent layer
    assert not pipe.mask_to_keep(rgba)[3, 3] and pipe.mask_to_keep(rgba).sum() == 15
    opaque = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    opaque.paste((255, 255, 255, 255), (0, 0, 8, 8))  # white-on-black saved as RGBA: brightness counts
    assert not pipe.mask_to_keep(opaque)[0, 0] and pipe.mask_to_keep(opaque).sum() == 15
    faint = np.zeros((256, 256), np.uint8)
    faint[100, :] = 255  # a 1-pixel line in a large mask survives the resize
    assert (~pipe.mask_to_keep(faint)).sum() == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_labels="dogs"), "unknown class"),
    (dict(class_labels=7), "out of range"),
    (dict(class_labels=1.5), "class names or indices"),
    (dict(num_images=0), "num_images must be"),
    (dict(num_images=7), "num_images must be"),
    (dict(num_images=2.0), "num_images must be"),
    (dict(num_images=np.int64(9)), "num_images must be"),
    (dict(class_labels=[0, 1, 2], num_images=2), "one per image"),
    (dict(class_labels=[0, 1], num_images=1), "2 class labels but num_images=1"),
    (dict(temperature=0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=33), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(class_labels=0, guidance_scale=-1), "guidance_scale"),
    (dict(guidance_scale=-1), "guidance_scale"),  # checked without labels too
    (dict(output_type="jpeg"), "output_type"),
    (dict(generator=42), "torch.Generator"),
])
def test_bad_generation_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


@pytest.mark.parametrize("image, message", [
    ([], "no image"),
    ("not an image", "PIL image"),
    (np.zeros((4, 4), np.float32), "uint8"),
    (torch.zeros(1, 4, 32, 32), "float"),
    (torch.zeros(0, 3, 32, 32), "image tensor is empty"),
    (torch.zeros(1, 3, 0, 0), "image tensor is empty"),
    (torch.zeros(2, 3, 32, 32), "reconstruct takes one image, got 2"),
])
def test_bad_images(pipe, image, message):
    with pytest.raises(ValueError, match=message):
        pipe.reconstruct(image)


@pytest.mark.parametrize("mode", ["L", "P", "I;16", "CMYK", "RGBA", "LA", "1"])
def test_any_image_mode_is_converted(pipe, mode):
    image = Image.new("RGB", (50, 30), (200, 30, 30)).convert(mode)
    rec = pipe.reconstruct(image)
    assert rec.input_image.mode == rec.images[0].mode == "RGB"


def test_numpy_integers_and_zero_one_masks_are_accepted(pipe):
    assert len(pipe(0, num_images=np.int64(2)).images) == 2
    assert len(pipe(num_images=np.int64(2)).images) == 2  # no label: the count goes to the sampler
    for mask in (np.ones((32, 32), bool), np.ones((32, 32), np.uint8), np.ones((32, 32), np.float32),
                 torch.ones(32, 32), np.full((32, 32), 255, np.uint8)):
        assert not pipe.mask_to_keep(mask).any(), mask.dtype  # 1 (or 255) = regenerate everything
    half = np.zeros((32, 32), bool)
    half[16:] = True
    assert pipe.mask_to_keep(half).sum() == 8


def test_mask_outside_the_centre_crop_is_explained(pipe):
    image = Image.new("RGB", (64, 32), (10, 200, 10))
    mask = np.zeros((32, 64), np.uint8)
    mask[:, :12] = 255  # left edge: cropped away with the image's sides
    with pytest.raises(ValueError, match="disappears when the image is resized and center-cropped"):
        pipe.complete(image, mask)
    mask[:, 16:20] = 255  # now also inside the centre square: its left code column is regenerated
    keep = pipe.mask_to_keep(mask)
    assert not keep[:, 0].any() and keep[:, 1:].all()


def test_empty_or_malformed_mask(pipe):
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="mask is empty"):
        pipe.complete(image, Image.new("L", (32, 32), 0))
    with pytest.raises(ValueError, match="single-channel"):
        pipe.complete(image, np.zeros((2, 3, 32, 32), np.uint8))
    # a mask of another size is resized; all white regenerates everything
    out = pipe.complete(image, Image.new("L", (64, 64), 255), generator=gen(0))
    assert out.codes.shape == (1, 4, 4, 2)


def test_mismatched_models_and_bad_folders(tmp_path, pipe):
    other = RQTransformer(RQTransformerConfig(codebook_size=64, code_shape=(4, 4, 2), dim=32, heads=2,
                                              spatial_layers=1, depth_layers=1, num_classes=0, dropout=0.0))
    with pytest.raises(ValueError, match="expects codes"):
        RQPipeline(pipe.rqvae, other)
    with pytest.raises(ValueError, match="does not exist"):
        RQPipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "cat.png").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        RQPipeline.from_pretrained(tmp_path / "cat.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no rqvae/"):
        RQPipeline.from_pretrained(tmp_path / "empty")
    pipe.save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "pipeline.json").write_text(json.dumps({"evil": 1}))
    with pytest.raises(ValueError, match="unexpected"):
        RQPipeline.from_pretrained(tmp_path / "p")


# ---- prompts (text models) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_pipe():
    return tiny_text_pipeline()


def test_prompt_string_or_list_sets_the_batch_and_combines_with_classes(text_pipe):
    out = text_pipe(prompt="red circle", num_images=3, generator=gen(0))
    assert out.prompts == ["red circle"] * 3 and out.class_labels is None and out.codes.shape == (3, 4, 4, 2)
    assert text_pipe(prompt=["red circle", "blue square"]).prompts == ["red circle", "blue square"]
    both = text_pipe("stars", prompt=["red circle", "blue square"], num_images=2)
    assert both.class_labels == [2, 2] and both.prompts == ["red circle", "blue square"]
    assert text_pipe(["stars", 0], prompt="green star").prompts == ["green star"] * 2
    assert text_pipe([0, 1], prompt=["a", "b"]).class_labels == [0, 1]
    with pytest.raises(ValueError, match="2 class labels but 3 prompts: give one of either to repeat"):
        text_pipe(["stars", 0], prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="2 prompts but num_images=3: give one prompt to repeat"):
        text_pipe(prompt=["a", "b"], num_images=3)


def test_prompts_condition_the_samples_deterministically(text_pipe):
    a = text_pipe(prompt="red circle", num_images=3, generator=gen(0), guidance_scale=2.0).codes
    assert torch.equal(a, text_pipe(prompt=["red circle"] * 3, generator=gen(0), guidance_scale=2.0).codes)
    assert not torch.equal(a, text_pipe(prompt="blue square", num_images=3, generator=gen(0),
                                        guidance_scale=2.0).codes)
    assert not torch.equal(a, text_pipe(prompt="red circle", num_images=3, generator=gen(1),
                                        guidance_scale=2.0).codes)
    # no prompt = the empty prompt; normalisation makes case and spacing irrelevant
    assert torch.equal(text_pipe(num_images=2, generator=gen(4)).codes,
                       text_pipe(prompt=" ", num_images=2, generator=gen(4)).codes)
    assert torch.equal(text_pipe(prompt="Red   CIRCLE", generator=gen(2)).codes,
                       text_pipe(prompt="red circle", generator=gen(2)).codes)
    items = list(text_pipe.stream(prompt="green star", num_images=2, generator=gen(3), output_type="pt"))
    assert len(items) == 4 and all(i.prompts == ["green star"] * 2 for i in items)
    assert torch.equal(items[-1].codes, text_pipe(prompt="green star", num_images=2, generator=gen(3)).codes)


def test_long_prompts_are_truncated_and_reported(text_pipe):
    long = "a small red square beside a big blue circle and a yellow star"  # > max_text_len (6) tokens
    with pytest.warns(UserWarning, match=r"1 prompt longer than the model's 6 tokens truncated: 'a small red"):
        out = text_pipe(prompt=[long, "red circle", long])
    assert out.truncated_prompts == [long] and out.prompts == [long, "red circle", long]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits: no warning
        assert text_pipe(prompt="red circle").truncated_prompts == []
    huge = "red circle " * 200_000  # cut to a few hundred characters before tokenizing, still reported
    with pytest.warns(UserWarning, match="truncated"):
        out = text_pipe.complete(Image.new("RGB", (32, 32)), np.ones((32, 32)), prompt=huge)
    assert out.truncated_prompts == [huge]


@pytest.mark.parametrize("prompt", ["猫 🐱 على", "e\u0301 \u202eRTL\u202c ﷺ", "\x00\x1b[31m\ttab",
                                    "\ud83d\ude00 \ud800", "[PAD] <|endoftext|>", "Ǆ" * 500])
def test_any_unicode_prompt_works(text_pipe, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long ones are truncated
        out = text_pipe(prompt=prompt, num_images=2, generator=gen(0))
    assert out.codes.shape == (2, 4, 4, 2) and len(out.prompts) == 2
    out.prompts[0].encode("utf-8")  # lone surrogates replaced: the prompt can be shown or sent as JSON


def test_prompt_for_a_model_without_text_is_refused(pipe):
    with pytest.raises(ValueError, match="^this model has no text conditioning: leave prompt empty"):
        pipe("stars", prompt="red circle")


@pytest.mark.parametrize("prompt, message", [
    (5, "prompt must be a string or a list of strings .* got int"),
    (b"red circle", "got bytes"),
    (["red circle", 3], "prompts must be strings; prompt 1 is int 3"),
    ([None], "prompt 0 is NoneType"),
    ([], "give 1 to 6 prompts, got 0"),
    (["red"] * 7, "give 1 to 6 prompts, got 7"),
])
def test_bad_prompts(text_pipe, prompt, message):
    with pytest.raises(ValueError, match=message) as info:
        text_pipe(prompt=prompt)
    assert "\n" not in str(info.value)


def test_no_prompt_needs_caption_dropout(text_pipe):
    strict = RQPipeline(text_pipe.rqvae, text_pipe.transformer, caption_dropout=0.0)
    for prompt in (None, "", "  \n "):
        with pytest.raises(ValueError, match="trained without caption dropout, so it cannot sample from the empty"):
            strict(prompt=prompt)
    with pytest.raises(ValueError, match="empty prompt"):
        strict(prompt=["red circle", ""])
    assert strict(prompt="red circle").prompts == ["red circle"]
    assert RQPipeline(text_pipe.rqvae, text_pipe.transformer)(num_images=2).prompts is None  # unknown: allowed


def test_prompts_json_and_caption_dropout_round_trip(text_pipe, tmp_path):
    captions = text_pipe.prompts + ["猫 🐱 on a mat"]
    RQPipeline(text_pipe.rqvae, text_pipe.transformer, caption_dropout=0.1, prompts=captions).save_pretrained(
        tmp_path / "p")
    assert json.loads((tmp_path / "p" / "rqtransformer" / "prompts.json").read_text(encoding="utf-8")) == captions
    assert json.loads((tmp_path / "p" / "pipeline.json").read_text())["caption_dropout"] == 0.1
    loaded = RQPipeline.from_pretrained(tmp_path / "p", device="cpu")
    assert loaded.prompts == captions and loaded.caption_dropout == 0.1 and loaded.has_text
    assert torch.equal(loaded(prompt="blue square", num_images=2, generator=gen(7)).codes,
                       text_pipe(prompt="blue square", num_images=2, generator=gen(7)).codes)
    loaded.prompts.append("x")  # a copy: the pipeline's list does not change
    assert loaded.prompts == captions
    with pytest.raises(ValueError, match="prompts are example prompts for a text model"):
        RQPipeline(loaded.rqvae, tiny_pipeline().transformer, prompts=["red circle"])
    loaded.transformer.tokenizer = None
    with pytest.raises(ValueError, match="this text model has no tokenizer"):
        RQPipeline(loaded.rqvae, loaded.transformer)


def test_models_without_text_have_no_prompts(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p" / "rqtransformer" / "prompts.json").exists()
    assert "caption_dropout" not in json.loads((tmp_path / "p" / "pipeline.json").read_text())
    loaded = RQPipeline.from_pretrained(tmp_path / "p", device="cpu")
    assert loaded.prompts == [] and not loaded.has_text and loaded.caption_dropout is None


def test_class_title_round_trip_and_bad_values(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "plain")
    assert "class_title" not in json.loads((tmp_path / "plain" / "pipeline.json").read_text())
    assert RQPipeline.from_pretrained(tmp_path / "plain").class_title == "Class"
    RQPipeline(pipe.rqvae, pipe.transformer, class_title="Style").save_pretrained(tmp_path / "styled")
    assert RQPipeline.from_pretrained(tmp_path / "styled").class_title == "Style"
    for bad in ("", "   ", 3, "x" * 41, "a\nb"):
        with pytest.raises(ValueError, match="class_title must be a short name"):
            RQPipeline(pipe.rqvae, pipe.transformer, class_title=bad)
    (tmp_path / "styled" / "pipeline.json").write_text(json.dumps({"class_title": ["Style"]}))
    with pytest.raises(ValueError, match="class_title must be a short name"):
        RQPipeline.from_pretrained(tmp_path / "styled")


def test_class_display_names_label_classes_and_round_trip(pipe, tmp_path):
    named = RQPipeline(pipe.rqvae, pipe.transformer, class_display_names={"stars": " Star shapes ", "circles": "Rings"})
    assert named.class_display_names == {"stars": "Star shapes", "circles": "Rings"}
    # a display name works as a class label, beside the class name and the index
    assert named(["Star shapes", "stars", 2, "Rings"], generator=gen(0)).class_labels == [2, 2, 2, 0]
    with pytest.raises(ValueError, match="did you mean 'Star shapes'.*or a display name"):
        named("Star shape")
    named.save_pretrained(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "pipeline.json").read_text())["class_display_names"]
    assert saved == named.class_display_names
    assert RQPipeline.from_pretrained(tmp_path / "p").class_display_names == saved
    pipe.save_pretrained(tmp_path / "plain")  # no map: nothing written
    assert "class_display_names" not in json.loads((tmp_path / "plain" / "pipeline.json").read_text())
    for bad, message in (({"moons": "Moons"}, "'moons' is not a class of this model"),
                         ({"stars": ""}, "display name of 'stars' must be a short name"),
                         ({"stars": 3}, "display name of 'stars' must be a short name"),
                         ({"stars": "x" * 41}, "must be a short name"),
                         ({"stars": "Shapes", "circles": "shapes"}, "'shapes' would name two classes"),
                         ({"stars": "circles"}, "'circles' would name two classes"),
                         (["stars"], "must map class names to display names")):
        with pytest.raises(ValueError, match=message):
            RQPipeline(pipe.rqvae, pipe.transformer, class_display_names=bad)
    (tmp_path / "p" / "pipeline.json").write_text(json.dumps({"class_display_names": {"moons": "Moons"}}))
    with pytest.raises(ValueError, match="'moons' is not a class of this model"):
        RQPipeline.from_pretrained(tmp_path / "p")


def test_examples_round_trip_and_bad_ones_are_named(pipe, tmp_path):
    from conftest import tiny_text_pipeline

    text = tiny_text_pipeline()
    chosen = [{"prompt": "red circle", "class": "stars"}, {"prompt": "blue square", "class": "circles",
                                                           "image": "examples/complete/blue.png"}]
    text.examples = chosen
    text.save_pretrained(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "pipeline.json").read_text())["examples"] == chosen
    assert RQPipeline.from_pretrained(tmp_path / "t").examples == chosen
    assert RQPipeline(pipe.rqvae, pipe.transformer, examples=[{"class": "stars"}]).examples == [{"class": "stars"}]
    for model, bad, message in (
            (text, {"prompt": "red circle"}, r"examples\[0\] needs a class, one of"),
            (text, {"prompt": "red circle", "class": "moons"}, r"needs a class, one of \['circles'"),
            (text, {"class": "stars"}, "needs a non-empty prompt string"),
            (text, {"prompt": " ", "class": "stars"}, "needs a non-empty prompt string"),
            (pipe, {"prompt": "red", "class": "stars"}, "needs no prompt"),
            (text, {"prompt": "a", "class": "stars", "image": "../../etc/x.png"}, "a .png path under examples/"),
            (text, {"prompt": "a", "class": "stars", "image": "examples/../../x.png"}, "a .png path under examples/"),
            (text, {"prompt": "a", "class": "stars", "seed": 3}, "an object with some of"),
            (text, "red circle", "an object with some of")):
        with pytest.raises(ValueError, match=message):
            RQPipeline(model.rqvae, model.transformer, examples=[bad], prompts=model.prompts)
    with pytest.raises(ValueError, match="examples must be a list"):
        RQPipeline(text.rqvae, text.transformer, examples={"prompt": "a"})
    (tmp_path / "t" / "pipeline.json").write_text(json.dumps({"examples": [{"prompt": "a", "class": "moons"}]}))
    with pytest.raises(ValueError, match="needs a class"):
        RQPipeline.from_pretrained(tmp_path / "t")

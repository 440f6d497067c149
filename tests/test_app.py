"""The Gradio app served on 127.0.0.1 around a tiny untrained pipeline, called through gradio_client."""
from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app  # noqa: E402
from pipelines import RQPipeline  # noqa: E402

from conftest import CAPTIONS, CLASSES, editor, pixels, serve_app, tiny_pipeline, tiny_text_pipeline  # noqa: E402


def test_only_the_three_endpoints_are_public(served):
    client, *_ = served
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/generate", "/reconstruct", "/complete"}


def test_generate_with_no_arguments(served):
    client, *_ = served
    gallery = client.predict(api_name="/generate")
    assert len(gallery) == 4  # the default number of images
    for item in gallery:
        assert Image.open(item["image"]).size == (256, 256)  # 32 px upscaled for display
        assert item["caption"] in [app.pretty(n) for n in CLASSES]  # "Random class" draws a class per image


def test_generate_streams_previews_then_final(served):
    client, *_ = served
    job = client.submit("squares", 2, 3, api_name="/generate")
    final = job.result()
    outputs = job.outputs()
    # previews after code rows 1..3 of the 4x4 grid, those the app was too busy for skipped, then the final
    assert 1 <= len(outputs) <= 4
    assert [pixels(a).tolist() for a in outputs[-1]] == [pixels(a).tolist() for a in final]
    if len(outputs) > 1:
        assert (pixels(outputs[0][0])[96:] == 128).all()  # the last row is not sampled yet: grey


def test_same_seed_same_images(served):
    client, *_ = served
    kw = dict(class_name="stars", num_images=2, top_k=8, top_p=0.9, guidance_scale=2.0, api_name="/generate")
    a = client.predict(seed=11, **kw)
    b = client.predict(seed=11, **kw)
    c = client.predict(seed=12, **kw)
    assert [pixels(x).tolist() for x in a] == [pixels(x).tolist() for x in b]
    assert [pixels(x).tolist() for x in a] != [pixels(x).tolist() for x in c]
    assert [x["caption"] for x in a] == ["Stars", "Stars"]


def test_concurrent_visitors_are_sampled_as_one_batch_with_the_images_each_gets_alone(served, monkeypatch):
    from pipelines import batching

    client, *_ = served
    calls = [dict(class_name="stars", num_images=2, seed=11, guidance_scale=2.0),
             dict(class_name="circles", num_images=1, seed=12, top_k=5),
             dict(class_name="Random class", num_images=3, seed=13, temperature=0.8),
             dict(class_name="squares", num_images=2, seed=14, top_p=0.9, guidance_scale=1.0)]
    alone = [[pixels(x).tolist() for x in client.predict(**c, api_name="/generate")] for c in calls]
    sizes, waited, sample = [], [], batching.Batcher._sample

    def first_waits(self, batch):  # a first batch without them all waits until the others queue up behind it
        if not sizes and len(batch) < len(calls):
            deadline = time.monotonic() + 60
            while len(batch) + len(self._waiting) < len(calls) and time.monotonic() < deadline:
                time.sleep(0.01)
            waited.append(len(self._waiting))
        sizes.append(len(batch))
        return sample(self, batch)
    monkeypatch.setattr(batching.Batcher, "_sample", first_waits)
    jobs = [client.submit(**c, api_name="/generate") for c in calls]
    together = [[pixels(x).tolist() for x in job.result()] for job in jobs]
    # all in one batch; or the first ones start and the others join them (the batch restarts: none of it was
    # sent yet) or come next, together
    first, *rest = sizes
    assert rest in ([], [len(calls)], [len(calls) - first]) and max(sizes) > 1, (sizes, waited)
    assert together == alone


def test_reconstruct(served, files):
    client, *_ = served
    strip, heat = client.predict(handle_file(files["good"]), api_name="/reconstruct")
    assert [x["caption"].split(":")[0] for x in strip] == ["input (resized)", "depth 1", "depth 2"]
    assert all(x["caption"].endswith(" dB") for x in strip[1:])
    heat_map = np.asarray(Image.open(heat))
    assert heat_map.shape == (320, 320, 3) and len(np.unique(heat_map.reshape(-1, 3), axis=0)) > 2


def test_complete_with_mask_and_with_box(served, files):
    client, *_ = served
    painted = client.predict(editor(files["good"], files["mask"]), "circles", 2, 5, api_name="/complete")
    assert len(painted) == 3 and painted[0]["caption"] == "shaded = regenerated"
    shown = pixels(painted[0])  # the input with the regenerated cells shaded magenta: the bottom half
    assert shown[128:, :, 2].min() >= 100 and shown[:128, :, 2].min() < 50
    again = client.predict(editor(files["good"], files["mask"]), "circles", 2, 5, api_name="/complete")
    assert [pixels(x).tolist() for x in painted] == [pixels(x).tolist() for x in again]
    boxed = client.predict(editor(files["good"]), use_box=True, x0=0.0, y0=0.5, x1=1.0, y1=1.0, num_images=1,
                           api_name="/complete")
    assert len(boxed) == 2
    assert np.array_equal(pixels(boxed[0]), shown)  # same region as the painted bottom half


@pytest.mark.parametrize("call, message", [
    (dict(class_name="unicorns", api_name="/generate"),
     "Class: Value: unicorns is not in the list of choices; choose one of 'Random class', 'circles', 'squares'"),
    (dict(num_images=0, api_name="/generate"), "Number of images: Value 0 is less than minimum value 1"),
    (dict(num_images=7, api_name="/generate"), "Number of images: Value 7 is greater than maximum value 6"),
    (dict(temperature=0, api_name="/generate"), "Temperature: Value 0 is less than minimum value 0.1"),
    (dict(top_p=2, api_name="/generate"), "Top-p (1 = off): Value 2 is greater than maximum value 1"),
    (dict(top_k=33, api_name="/generate"), "Top-k (0 = off): Value 33 is greater than maximum value 32"),
    (dict(seed=-1, api_name="/generate"), "Seed: Value -1 is less than minimum value 0"),
    (dict(seed=2**63, api_name="/generate"), "Seed: Value 9223372036854775808 is greater than maximum value"),
    (dict(image="truncated", api_name="/reconstruct"),
     "Image: could not read the uploaded image (image file is truncated"),
    (dict(image="garbage", api_name="/reconstruct"), "Image: could not read the uploaded image"),
    (dict(editor="good", api_name="/complete"), "the mask is empty: paint over the region to regenerate"),
    (dict(editor="good", use_box=True, x0=0.6, x1=0.4, api_name="/complete"), "Box: need 0 <= x0 < x1 <= 1"),
    (dict(editor="good", use_box=True, x0=0.5, y0=0.5, x1=0.51, y1=0.51, api_name="/complete"),
     "Box: covers no pixel of this 40x40 image; make it larger"),
    (dict(editor="wide", use_box=True, x0=0, y0=0, x1=0.2, y1=1, api_name="/complete"),
     "the painted region disappears when the image is resized and center-cropped to 32x32"),
    (dict(editor="garbage", api_name="/complete"), "Image: could not read the uploaded image"),
])
def test_bad_inputs_give_clear_messages_and_the_server_stays_up(served, files, call, message):
    client, *_ = served
    call = dict(call)
    if "image" in call:
        call["image"] = handle_file(files[call["image"]])
    if "editor" in call:
        call["image"] = editor(files[call.pop("editor")])
    with pytest.raises(AppError) as info:
        client.predict(**call)
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)
    assert len(client.predict(num_images=1, api_name="/generate")) == 1  # the next request is served


def test_missing_weights_exit_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        app.main(["--weights", str(tmp_path / "nowhere")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err and "does not exist" in err
    page = app.error_demo("pipeline folder x does not exist")  # what a Space shows instead
    assert isinstance(page, gr.Blocks)


@pytest.mark.parametrize("argv, env, message", [
    (["--max_rows", "0"], None, "--max_rows must be at least 1"),
    ([], ("RQ_MAX_ROWS", "abc"), "$RQ_MAX_ROWS must be a whole number"),
    (["--cpu_weights", "int3"], None, "argument --cpu_weights: invalid choice: 'int3'"),
    ([], ("RQ_CPU_WEIGHTS", "half"), "$RQ_CPU_WEIGHTS must be one of auto, float32, float16, int8, int4, got 'half'"),
    ([], ("RQ_CPU_DECODER", "fp8"), "$RQ_CPU_DECODER must be one of auto, float32, bfloat16, got 'fp8'")])
def test_a_bad_setting_exits_2_with_a_clear_message(argv, env, message, monkeypatch, capsys):
    if env is not None:
        monkeypatch.setenv(*env)
    with pytest.raises(SystemExit) as info:
        app.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and message in err and "Traceback" not in err


def test_class_names_shown_nicely():
    assert app.pretty("smileys_and_emotion") == "Smileys & emotion"
    assert app.pretty("travel_and_places") == "Travel & places" and app.pretty("flags") == "Flags"


def test_class_names_are_checked_by_the_pipeline_not_the_app(tmp_path, monkeypatch):
    """Over HTTP the dropdown refuses unlisted names first (test above); past it, the app passes the
    choice on unchecked and the user sees the pipeline's message."""
    assert app.pick_labels(CLASSES, "starz", 2, 0) == "starz"  # the pipeline repeats it num_images times
    assert app.pick_labels([], app.RANDOM_CLASS, 2, 0) is None  # unconditional
    drawn = app.pick_labels(CLASSES, app.RANDOM_CLASS, 5, 7)
    assert len(drawn) == 5 and set(drawn) <= set(CLASSES) and drawn == app.pick_labels(CLASSES, None, 5, 7)
    monkeypatch.setattr(app, "CACHE_ROOT", tmp_path / "cache")
    demo = app.build_demo(tiny_pipeline())
    endpoints = {f.api_name: f.fn for f in demo.fns.values() if f.api_name}
    with pytest.raises(gr.Error) as info:
        list(endpoints["generate"]("starz", 2, 0))
    assert info.value.message.startswith("unknown class 'starz'; did you mean 'stars'?")
    background, mask = Image.new("RGBA", (40, 40), (200, 0, 0, 255)), Image.new("L", (40, 40), 255)
    with pytest.raises(gr.Error) as info:
        endpoints["complete"]({"background": background, "layers": [mask]}, "starz", 2, 0)
    assert info.value.message.startswith("unknown class 'starz'")


# ---- models with text -----------------------------------------------------------------------

def app_logs(job) -> list[tuple[str, str]]:
    """The (message, level) log lines (gr.Info/gr.Warning) a finished job received."""
    logs, updates = [], job.communicator.updates
    while not updates.empty():
        update = updates.get_nowait()
        if getattr(update, "log", None):
            logs.append(update.log)
    return logs


def test_text_app_generates_with_a_prompt_and_with_none(served_text):
    client, _ = served_text
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for api in ("/generate", "/complete"):
        assert [p["parameter_default"] for p in endpoints[api]["parameters"] if p["parameter_name"] == "prompt"] == [""]
    plain = client.predict(api_name="/generate")  # no prompt: the empty prompt (trained with caption dropout)
    assert len(plain) == 4 and not any(x["caption"] for x in plain)  # no class, no prompt: nothing to show
    red = client.predict(prompt="red circle", num_images=2, seed=3, api_name="/generate")
    assert [x["caption"] for x in red] == ["red circle", "red circle"]
    again = client.predict(prompt="red circle", num_images=2, seed=3, api_name="/generate")
    blue = client.predict(prompt="blue square", num_images=2, seed=3, api_name="/generate")
    assert [pixels(x).tolist() for x in red] == [pixels(x).tolist() for x in again]
    assert [pixels(x).tolist() for x in red] != [pixels(x).tolist() for x in blue]
    unicode = client.predict(prompt="猫 🐱 على", num_images=1, api_name="/generate")
    assert unicode[0]["caption"] == "猫 🐱 على"


def test_text_app_survives_a_lone_surrogate_in_the_prompt(served_text):
    """Valid JSON ("\\ud800" escapes) but not valid Unicode: the tokenizer and the JSON reply need the
    pipeline's repair (gradio_client cannot even send it, so this is a raw request)."""
    client, _ = served_text
    body = '{"data": ["Random class", 1, 0, 1.0, 0, 1.0, 3.0, "cat \\ud800"]}'
    r = httpx.post(f"{client.src}gradio_api/call/generate", content=body, timeout=30,
                   headers={"content-type": "application/json"})
    r.raise_for_status()
    reply = httpx.get(f"{client.src}gradio_api/call/generate/{r.json()['event_id']}", timeout=120).text
    event, data = reply.strip().split("\n\n")[-1].split("\n", 1)
    assert event == "event: complete", reply[-500:]
    assert json.loads(data.removeprefix("data: "))[0][0]["caption"] == "cat \ufffd"  # the replacement character


def test_text_app_completes_with_a_prompt(served_text, tmp_path):
    client, _ = served_text
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    mask = np.zeros((40, 40), np.uint8)
    mask[20:] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    out = client.predict(editor(tmp_path / "red.png", tmp_path / "mask.png"), num_images=2, prompt="blue square",
                         api_name="/complete")
    assert [x["caption"] for x in out] == ["shaded = regenerated", "blue square", "blue square"]


def test_text_app_warns_about_a_truncated_prompt(served_text):
    client, _ = served_text
    long = "a small red square beside a big blue circle and a yellow star"  # > 6 tokens
    job = client.submit(prompt=long, num_images=1, api_name="/generate")
    assert job.result()[0]["caption"] == long
    assert [level for message, level in app_logs(job) if message.startswith("Prompt too long")] == ["warning"]
    short = client.submit(prompt="red circle", num_images=1, api_name="/generate")
    short.result()
    assert not app_logs(short)


def test_prompt_box_examples_and_captions_follow_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "CACHE_ROOT", tmp_path / "cache")
    for pipe, has_text in ((tiny_pipeline(), False), (tiny_text_pipeline(), True)):
        demo = app.build_demo(pipe)
        boxes = [b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.label == "Prompt"]
        assert len(boxes) == 2 and all(b.visible == has_text for b in boxes)  # Generate and Complete
        samples = [s for b in demo.blocks.values() if isinstance(b, gr.Dataset) for s in b.samples]
        assert any(set(s) & set(CAPTIONS) for s in samples) == has_text  # example prompts from pipe.prompts
    # a text model with classes titled "Style": the dropdowns say so, and each example prompt takes another style
    styled = RQPipeline(pipe.rqvae, pipe.transformer, class_title="Style", prompts=pipe.prompts)
    demo = app.build_demo(styled)
    drops = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown)]
    assert len(drops) == 2 and {b.label for b in drops} == {"Style"}
    assert drops[0].choices[0] == ("Random style", "Random style")
    rows = [s for b in demo.blocks.values() if isinstance(b, gr.Dataset) for s in b.samples]
    assert [r[0] for r in rows] == [CLASSES[i % 3] for i in range(len(rows))] and len(rows) == 5
    out = pipe(["stars", 0], prompt="red circle")
    assert app.captions(pipe, out) == ["red circle · Stars", "red circle · Circles"]
    # display names from pipeline.json: in the dropdowns (sorted as shown), the captions and the model facts
    named = RQPipeline(pipe.rqvae, pipe.transformer, class_display_names={"stars": "Asterisks"}, prompts=pipe.prompts)
    drops = [b for b in app.build_demo(named).blocks.values() if isinstance(b, gr.Dropdown)]
    assert drops[0].choices[1:] == [("Asterisks", "stars"), ("Circles", "circles"), ("Squares", "squares")]
    assert app.captions(named, named(["stars", 0], prompt="red circle")) == ["red circle · Asterisks",
                                                                          "red circle · Circles"]
    assert "choices: Circles, Squares, Asterisks." in app.model_facts(named)
    assert app.pick_prompt("  ") is None and app.pick_prompt(None) is None and app.pick_prompt(" a ") == " a "


def test_measured_examples_pick_each_prompt_its_class_and_complete_its_own_image(tmp_path, monkeypatch):
    """pipeline.json's examples (written by evaluation.choose_examples): the Generate rows are its (prompt,
    class) pairs; the Complete rows the entries with an image, each with its own prompt and class."""
    monkeypatch.setattr(app, "CACHE_ROOT", tmp_path / "cache")
    pipe = tiny_text_pipeline()
    pipe.examples = [{"prompt": "red circle", "class": "squares"}, {"prompt": "blue square", "class": "stars"},
                     {"prompt": "green star", "class": "circles", "image": "examples/complete/x.png"}]
    pipe.save_pretrained(tmp_path / "w")
    (tmp_path / "w" / "examples" / "complete").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "w" / "examples" / "complete" / "x.png")
    demo = app.build_demo(str(tmp_path / "w"))
    datasets = [b for b in demo.blocks.values() if isinstance(b, gr.Dataset)]
    generate, complete = datasets[0].samples, datasets[-1].samples
    assert [(r[0], r[-1]) for r in generate] == [("squares", "red circle"), ("stars", "blue square"),
                                                 ("circles", "green star")]
    assert len(complete) == 1 and complete[0][1] == "circles" and complete[0][-1] == "green star"
    assert "x.png" in json.dumps(complete[0][0])  # the ImageEditor's value: its own image


# ---- what the page shows: captions, failed calls, the class title, the model card -----------------

# a card whose intro runs past the summary's 2,000 characters: eight paragraphs of about 300
INTRO = [f"Paragraph {i}: " + "a small model of coloured shapes, trained briefly on a CPU. " * 5 for i in range(8)]
CARD = "---\nlicense: other\ntags: [rq-vae]\n---\n# styled shapes\n\n" + "\n\n".join(INTRO) + \
    "\n\n## Data and licences\n\nthe section the summary leaves out\n"


@pytest.fixture(scope="module")
def served_styled(tmp_path_factory):
    """The app around a saved tiny pipeline whose classes are styles, with its own long model card."""
    root = tmp_path_factory.mktemp("styled_app")
    pipe = tiny_pipeline()
    RQPipeline(pipe.rqvae, pipe.transformer, max_images=6, class_title="Style").save_pretrained(root / "weights")
    (root / "weights" / "README.md").write_text(CARD, encoding="utf-8")
    with serve_app(root / "weights", root) as client:
        yield client


def page_config(client) -> dict:
    """The served page's config: its components, layout, CSS and event dependencies."""
    r = httpx.get(f"{client.src}config", timeout=30)
    r.raise_for_status()
    return r.json()


def test_gallery_captions_sit_below_the_images(served):
    """Gradio lays captions over the images' lower edge (a heart's tip); the page moves them below."""
    client, *_ = served
    config = page_config(client)
    galleries = [c for c in config["components"] if c["type"] == "gallery"]
    assert len(galleries) == 3 and all("captions-below" in c["props"]["elem_classes"] for c in galleries)
    assert ".captions-below .thumbnail-item .caption-label {position: static;" in config["css"]


def test_a_failed_call_clears_the_earlier_result(served, tmp_path, monkeypatch):
    """In the page, each endpoint's failure (a bad upload, say) triggers a private call that empties the
    endpoint's outputs, so no earlier result is left beside the error."""
    client, *_ = served
    deps = page_config(client)["dependencies"]
    public = [d for d in deps if d["api_visibility"] == "public"]
    assert {d["api_name"] for d in public} == {"generate", "reconstruct", "complete"}
    for dep in public:
        (clear,) = [d for d in deps if d["trigger_after"] == dep["id"] and d["trigger_only_on_failure"]]
        assert clear["outputs"] == dep["outputs"] and clear["inputs"] == [] and clear["api_visibility"] == "private"
    monkeypatch.setattr(app, "CACHE_ROOT", tmp_path / "cache")
    clears = [f for f in app.build_demo(tiny_pipeline()).fns.values() if f.trigger_only_on_failure]
    assert len(clears) == 3 and all(f.fn() == {o: None for o in f.outputs} for f in clears)


def test_the_class_error_names_the_class_title_and_its_random_choice(served_styled):
    client = served_styled
    for name, hint in (("unicorns", ""), ("starz", "did you mean 'stars'? ")):
        with pytest.raises(AppError) as info:
            client.predict(class_name=name, api_name="/generate")
        message = str(info.value)
        assert f"Style: Value: {name} is not in the list of choices; {hint}choose one of 'Random style', 'circles'" \
            in message
        assert "Random class" not in message and "Traceback" not in message
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_default"] for p in params if p["parameter_name"] == "class_name"] == ["Random style"]
    for choice in ("Random style", "Random class"):  # what the page shows, and what every model takes
        out = client.predict(class_name=choice, num_images=2, seed=4, api_name="/generate")
        assert len(out) == 2 and all(x["caption"] in [app.pretty(n) for n in CLASSES] for x in out)


def test_about_shows_the_card_summary_and_the_full_card_folded(served_styled):
    config = page_config(served_styled)
    components = {c["id"]: c for c in config["components"]}

    def children(node):
        return [components[c["id"]] for c in node.get("children", [])]

    def find(node, label):
        if components.get(node["id"], {}).get("props", {}).get("label") == label:
            return node
        return next(filter(None, (find(c, label) for c in node.get("children", []))), None)

    about = find(config["layout"], "About")
    summary, accordion = children(about)
    assert summary["type"] == "markdown" and accordion["type"] == "accordion"
    assert accordion["props"]["label"] == "Full model card" and accordion["props"]["open"] is False
    text = summary["props"]["value"]
    opening = text.split("\n\n### This model")[0]
    assert opening.startswith("# styled shapes") and len(opening) <= 2000 and "Data and licences" not in text
    assert (CARD.split("---\n")[2]).startswith(opening + "\n\n")  # cut where a paragraph ends
    assert "Style choices: Circles, Squares, Stars." in text and "Lee et al." in text  # the facts, the paper
    (full,) = children(find(config["layout"], "Full model card"))
    assert full["props"]["value"].startswith("# styled shapes") and "the section the summary leaves out" in \
        full["props"]["value"] and "license:" not in full["props"]["value"]

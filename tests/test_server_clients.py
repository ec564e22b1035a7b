"""`sdtorch serve` driven by clients nobody here wrote (issue 20): the PyPI client `webuiapi` and raw HTTP.

Each server is the real `python -m sdtorch serve` in a subprocess on a free loopback port (server_harness.py),
with the built-in shapes model (64x64, ~0.5 s per 10-step image on this 2-core machine). What is checked:
- webuiapi: txt2img (image size, seeds, infotexts), img2img, inpainting with a mask (inpaint_full_res on and
  off), the sampler list, model switching among --models-dir, a LoRA from --lora-dir, progress, interrupt and
  png-info. webuiapi fills every field itself (Euler a, scheduler "automatic", cfg 7, width 512...), so each
  call passes the size and steps it wants, as a user of that client would.
- raw HTTP: the JSON shapes of the responses against the fields of A1111's modules/api/models.py
  (TextToImageResponse, SamplerItem, SDModelItem, ProgressResponse, PNGInfoResponse) and the Lora extension.
- a bounded load test (20 concurrent loopback clients, 2 requests each, --queue-size 8): every response is the
  right one or a 503 with Retry-After, and memory stays flat.
- SIGTERM during a job: the request is answered, the process exits 0, nothing half-written is left.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import webuiapi  # a dev dependency (pyproject.toml): missing, these tests error rather than skip
from PIL import Image
from server_harness import request, running_server

A1111_SAMPLERS = {"DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "Euler a", "Euler", "LMS", "Heun", "DPM2", "DDIM",
                  "PLMS", "DDPM"}
GEN = dict(width=64, height=64, steps=10, cfg_scale=1.5)  # the built-in model's size; webuiapi would send 512
LORA = "shapelora"
SECOND_MODEL = "tiny"  # lower case: webuiapi's util_set_model lower-cases the name before it matches titles
INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "seed", "all_seeds", "subseed", "all_subseeds", "width",
             "height", "sampler_name", "cfg_scale", "steps", "batch_size", "sd_model_name", "sd_model_hash",
             "infotexts", "job_timestamp", "clip_skip", "styles", "index_of_first_image"}


# -- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """--models-dir with a second model (a tiny random diffusers folder) and --lora-dir with a LoRA made for the
    shapes model (random non-zero up weights, so it visibly changes the image), written in kohya format."""
    import sdtorch
    from sdtorch.lora import adapters, formats

    root = tmp_path_factory.mktemp("serve")
    models, loras = root / "models", root / "loras"
    loras.mkdir()
    sdtorch.build("tiny", seed=3).save_diffusers(models / SECOND_MODEL)
    shapes = sdtorch.load("shapes")
    net = adapters.create_network(shapes, adapters.targets(shapes, text_encoder=True), rank=2, alpha=2.0, seed=7)
    weights = adapters.network_weights(net)
    g = torch.Generator().manual_seed(7)
    for aw in weights.values():
        aw.tensors["up"] = torch.randn(aw.tensors["up"].shape, generator=g) * 0.5
    formats.write_lora(loras / f"{LORA}.safetensors", weights, to="kohya",
                       metadata={"ss_network_dim": "2", "ss_network_alpha": "2.0", "ss_output_name": LORA})
    del shapes, net
    return models, loras


@pytest.fixture(scope="module")
def server(folders):
    models, loras = folders
    with running_server("--models-dir", models, "--lora-dir", loras, "--queue-size", "8") as s:
        yield s


@pytest.fixture()
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png(b64: str) -> Image.Image:
    data = base64.b64decode(b64, validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def in_thread(fn):
    """Start fn() on a thread; returns (thread, box) where box holds 'result' or 'error' and 'elapsed'."""
    box: dict = {}

    def run():
        t0 = time.perf_counter()
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box["error"] = e
        box["elapsed"] = time.perf_counter() - t0
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def wait_for(predicate, timeout: float, what: str, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- webuiapi ------------------------------------------------------------------------------------------------------
def test_webuiapi_txt2img(api):
    r = api.txt2img(prompt="a red circle in the middle", seed=1234, **GEN)
    assert len(r.images) == 1 and r.image.size == (64, 64) and r.image.format == "PNG"
    info = r.info
    assert isinstance(info, dict), f"info did not json-decode: {info!r}"
    assert info["seed"] == 1234 and info["all_seeds"] == [1234]
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 10, 1.5)
    assert info["sampler_name"] == "Euler a"  # webuiapi's default sampler, sent by the client
    assert len(info["infotexts"]) == 1
    text = info["infotexts"][0]
    assert text.startswith("a red circle in the middle\n")
    for field in ("Steps: 10", "Sampler: Euler a", "CFG scale: 1.5", "Seed: 1234", "Size: 64x64", "Model: shapes"):
        assert field in text, (field, text)
    assert r.image.info.get("parameters") == text  # the PNG carries the same parameters text
    again = api.txt2img(prompt="a red circle in the middle", seed=1234, **GEN)
    assert np.array_equal(pixels(again.image), pixels(r.image)), "the same seed gave another image"


def test_webuiapi_random_seed_is_reported(api):
    r = api.txt2img(prompt="a blue square", seed=-1, **GEN)
    assert r.info["seed"] >= 0 and r.info["all_seeds"] == [r.info["seed"]]
    assert f"Seed: {r.info['seed']}," in r.info["infotexts"][0]


def test_webuiapi_img2img(api):
    source = api.txt2img(prompt="a red circle", seed=11, **GEN).image
    r = api.img2img(images=[source], prompt="a blue square", seed=12, denoising_strength=0.6, **GEN)
    assert r.image.size == (64, 64)
    assert r.info["all_seeds"] == [12] and r.info["denoising_strength"] == 0.6
    assert "Denoising strength: 0.6" in r.info["infotexts"][0]
    diff = np.abs(pixels(r.image) - pixels(source)).mean()
    # strength 0.6 keeps the layout but repaints: a mean change of at least 1/255 rules out an echo of the input
    assert diff > 1.0, f"img2img returned (almost) the input image: mean |diff| {diff:.2f}"


def square_and_mask():
    """A red square on the built-in model's grey background, and a mask (white = repaint) a little larger than the
    square: repainting it must change the centre (a grey area could be repainted grey and show nothing)."""
    source = Image.new("RGB", (64, 64), (128, 128, 128))
    source.paste((220, 30, 30), (24, 24, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    return source, mask


@pytest.mark.parametrize("full_res", [True, False], ids=["inpaint_full_res", "whole_picture"])
def test_webuiapi_inpainting(api, full_res):
    source, mask = square_and_mask()
    r = api.img2img(images=[source], mask_image=mask, inpaint_full_res=full_res, prompt="a blue circle",
                    seed=22, mask_blur=4, **GEN)
    assert r.image.size == (64, 64) and r.info["all_seeds"] == [22]
    assert "Mode: inpaint" in r.info["infotexts"][0]
    out, src = pixels(r.image), pixels(source)
    # A1111 pastes the result over the original through the blurred mask: 8 px away from the mask's edge (twice
    # the blur radius of 4) the blurred mask is 0, so those pixels are the original's own, exactly
    keep = np.ones((64, 64), bool)
    keep[12:52, 12:52] = False
    assert np.array_equal(out[keep], src[keep]), "inpainting changed pixels far outside the mask"
    inside = np.abs(out[24:40, 24:40] - src[24:40, 24:40]).mean()
    # the repainted square differs from the red one by ~25-75 levels on average; 2 would catch a returned source
    assert inside > 2.0, f"inpainting left the masked area as it was: mean |diff| {inside:.2f}"


def test_webuiapi_inpaint_full_res_differs(api):
    """inpaint_full_res generates the masked crop at full size, so its result differs from the whole-picture one."""
    source, mask = square_and_mask()
    a, b = (api.img2img(images=[source], mask_image=mask, inpaint_full_res=full, prompt="a blue circle", seed=32,
                        **GEN).image for full in (True, False))
    assert np.abs(pixels(a) - pixels(b))[24:40, 24:40].mean() > 1.0, "inpaint_full_res made no difference"


def test_webuiapi_samplers(api):
    names = api.util_get_sampler_names()
    assert set(names) == A1111_SAMPLERS and len(names) == 11
    for sampler in ("DPM++ 2M", "Euler", "DDIM"):  # each name the list gives is also accepted by txt2img
        r = api.txt2img(prompt="a circle", seed=3, sampler_name=sampler, width=64, height=64, steps=4, cfg_scale=1.5)
        assert r.info["sampler_name"] == sampler and f"Sampler: {sampler}," in r.info["infotexts"][0]


def test_webuiapi_model_switching(api):
    assert api.util_get_model_names() == sorted(["shapes", SECOND_MODEL])
    assert api.util_get_current_model() == "shapes"
    try:
        api.util_set_model(SECOND_MODEL)
        assert api.util_get_current_model() == SECOND_MODEL
        r = api.txt2img(prompt="a circle", seed=5, **GEN)
        assert r.info["sd_model_name"] == SECOND_MODEL and f"Model: {SECOND_MODEL}" in r.info["infotexts"][0]
        assert r.image.size == (64, 64)
    finally:
        api.util_set_model("shapes")
    assert api.util_get_current_model() == "shapes"
    assert api.txt2img(prompt="a circle", seed=5, **GEN).info["sd_model_name"] == "shapes"


def test_webuiapi_lora(api):
    assert LORA in [x["name"] for x in api.get_loras()]
    prompt = "a red circle in the top left"
    plain = api.txt2img(prompt=prompt, seed=41, **GEN)
    tagged = api.txt2img(prompt=f"{prompt} <lora:{LORA}:0.8>", seed=41, **GEN)
    diff = np.abs(pixels(tagged.image) - pixels(plain.image)).mean()
    assert diff > 1.0, f"the LoRA did not change the image (mean |diff| {diff:.2f})"
    text = tagged.info["infotexts"][0]
    assert f"<lora:{LORA}:0.8>" in text and f'Lora hashes: "{LORA}: ' in text, text
    assert tagged.info["prompt"] == f"{prompt} <lora:{LORA}:0.8>"
    after = api.txt2img(prompt=prompt, seed=41, **GEN)  # the LoRA is applied for that one request only
    assert np.array_equal(pixels(after.image), pixels(plain.image)), "the LoRA stayed applied after its request"


def test_webuiapi_progress(api):
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    thread, box = in_thread(lambda: api.txt2img(prompt="a circle", seed=51, width=64, height=64, steps=120,
                                                cfg_scale=1.5))  # a few seconds: many polls land mid-run
    seen = []

    def moving():
        p = api.get_progress()
        seen.append(p["progress"])
        return 0 < p["progress"] < 1 and p

    p = wait_for(moving, 60, "progress strictly between 0 and 1")
    assert p["state"]["sampling_steps"] == 120 and 0 < p["state"]["sampling_step"] < 120
    assert p["state"]["job_count"] >= 1 and p["eta_relative"] > 0
    thread.join(120)
    assert "error" not in box, box.get("error")
    assert box["result"].info["steps"] == 120 and not box["result"].info.get("interrupted")
    done = api.get_progress()
    assert done["progress"] == 0 and done["state"]["job_count"] == 0, done
    assert all(0 <= x <= 1 for x in seen)


def test_webuiapi_interrupt(api):
    t0 = time.perf_counter()
    api.txt2img(prompt="a circle", seed=61, **GEN)
    ten_steps = time.perf_counter() - t0
    thread, box = in_thread(lambda: api.txt2img(prompt="a circle", seed=61, width=64, height=64, steps=300,
                                                cfg_scale=1.5))
    wait_for(lambda: api.get_progress()["state"]["sampling_step"] >= 3, 60, "the long job to start")
    assert api.interrupt() == {}
    thread.join(60)
    assert "error" not in box, box.get("error")
    r = box["result"]
    assert r.info["interrupted"] is True
    full = ten_steps * 30  # what 300 steps take at the 10-step rate measured above
    # it stopped within a few steps of the interrupt: well under half of the full run's time (the real margin is
    # about 10x; half leaves room for a busy machine)
    assert box["elapsed"] < full / 2, f"interrupted job took {box['elapsed']:.1f} s, the full run ~{full:.1f} s"
    assert all(im.size == (64, 64) for im in r.images)
    assert api.get_progress()["state"]["job_count"] == 0
    after = api.txt2img(prompt="a circle", seed=62, **GEN)  # the next job is not interrupted by the old flag
    assert after.info["interrupted"] is False and after.info["all_seeds"] == [62]


def test_webuiapi_png_info(api):
    r = api.txt2img(prompt="a yellow star, bright", negative_prompt="blurry", seed=71, **GEN)
    parsed = api.png_info(r.image)
    assert parsed.info == r.info["infotexts"][0]  # the `info` of png-info is the parameters text, not JSON
    p = parsed.parameters
    assert p["Prompt"] == "a yellow star, bright" and p["Negative prompt"] == "blurry"
    assert (p["Seed"], p["Steps"], p["Sampler"], p["CFG scale"], p["Size-1"], p["Size-2"]) == \
        ("71", "10", "Euler a", "1.5", "64", "64")


# -- raw HTTP: the JSON shapes of A1111's modules/api/models.py --------------------------------------------------
def test_http_txt2img_and_img2img_shapes(server):
    status, body, _ = server.post("/sdapi/v1/txt2img", {"prompt": "a circle", "seed": 81})
    assert status == 200, body
    assert set(body) == {"images", "parameters", "info"}  # TextToImageResponse
    assert isinstance(body["images"], list) and len(body["images"]) == 1 and isinstance(body["images"][0], str)
    assert png(body["images"][0]).size == (64, 64)  # the model's own size when the request leaves it out
    assert isinstance(body["parameters"], dict) and body["parameters"]["prompt"] == "a circle"
    assert isinstance(body["info"], str)
    info = json.loads(body["info"])
    assert isinstance(info, dict) and INFO_KEYS <= set(info), INFO_KEYS - set(info)
    assert info["all_seeds"] == [81] and info["all_prompts"] == ["a circle"] and info["all_subseeds"] == [-1]
    assert (info["steps"], info["cfg_scale"], info["sampler_name"]) == (10, 1.5, "DPM++ 2M")  # the model's defaults
    assert info["index_of_first_image"] == 0 and info["styles"] == [] and info["batch_size"] == 1
    assert isinstance(info["job_timestamp"], str) and len(info["job_timestamp"]) == 14
    assert isinstance(info["clip_skip"], int) and info["sd_model_name"] == "shapes"

    status, body, _ = server.post("/sdapi/v1/img2img", {"prompt": "a square", "seed": 82, "denoising_strength": 0.5,
                                                        "init_images": [body["images"][0]]})
    assert status == 200, body
    assert set(body) == {"images", "parameters", "info"}  # ImageToImageResponse
    info = json.loads(body["info"])
    assert INFO_KEYS <= set(info) and info["all_seeds"] == [82] and png(body["images"][0]).size == (64, 64)
    assert body["parameters"]["init_images"] is None  # include_init_images defaults to false, as A1111


def test_http_batch_seeds(server):
    status, body, _ = server.post("/sdapi/v1/txt2img", {"prompt": "a circle", "seed": 90, "batch_size": 2,
                                                        "n_iter": 1, "steps": 4})
    assert status == 200, body
    info = json.loads(body["info"])
    assert len(body["images"]) == 2 and info["all_seeds"] == [90, 91] and len(info["infotexts"]) == 2
    assert "Seed: 91," in png(body["images"][1]).info["parameters"]


def test_http_list_shapes(server):
    status, samplers, _ = server.get("/sdapi/v1/samplers")
    assert status == 200 and len(samplers) == 11
    for item in samplers:  # SamplerItem
        assert set(item) == {"name", "aliases", "options"}
        assert isinstance(item["name"], str) and isinstance(item["aliases"], list) and isinstance(item["options"], dict)
    status, models, _ = server.get("/sdapi/v1/sd-models")
    assert status == 200 and {m["title"] for m in models} == {"shapes", SECOND_MODEL}
    for item in models:  # SDModelItem
        assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(item)
        assert isinstance(item["title"], str) and isinstance(item["model_name"], str)
        assert isinstance(item["filename"], str)
    status, loras, _ = server.get("/sdapi/v1/loras")
    assert status == 200 and LORA in [x["name"] for x in loras]
    for item in loras:  # the Lora extension's /sdapi/v1/loras
        assert {"name", "alias", "path", "metadata"} <= set(item) and isinstance(item["metadata"], dict)
    ours = next(x for x in loras if x["name"] == LORA)
    assert ours["path"].endswith(f"{LORA}.safetensors") and ours["metadata"].get("ss_network_dim") == "2"


def test_http_progress_shape(server):
    status, p, _ = server.get("/sdapi/v1/progress?skip_current_image=true")
    assert status == 200
    assert {"progress", "eta_relative", "state", "current_image", "textinfo"} <= set(p)  # ProgressResponse
    assert {"skipped", "interrupted", "job", "job_count", "job_timestamp", "job_no", "sampling_step",
            "sampling_steps"} <= set(p["state"])
    assert isinstance(p["progress"], (int, float)) and isinstance(p["eta_relative"], (int, float))
    assert p["current_image"] is None


def test_http_png_info_shape(server):
    status, body, _ = server.post("/sdapi/v1/txt2img", {"prompt": "a star", "seed": 95, "steps": 4})
    assert status == 200
    status, info, _ = server.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]})
    assert status == 200
    assert set(info) == {"info", "items", "parameters"}  # PNGInfoResponse
    assert info["info"] == json.loads(body["info"])["infotexts"][0]
    assert isinstance(info["items"], dict) and info["parameters"]["Seed"] == "95"


# -- load ----------------------------------------------------------------------------------------------------------
CLIENTS, PER_CLIENT, QUEUE = 20, 2, 8
RSS_GROWTH_LIMIT_MB = 150  # see test_load


@pytest.fixture(scope="module")
def load_server():
    with running_server("--queue-size", str(QUEUE)) as s:
        yield s


def test_load_20_clients(load_server):
    s = load_server
    for i in range(5):  # warm-up: the first requests allocate torch's and the allocator's working buffers
        assert s.post("/sdapi/v1/txt2img", {"prompt": f"warm {i}", "seed": i, **GEN})[0] == 200
    rss_before = s.rss_kib()

    def one(job: int):
        seed, prompt = 100_000 + job, f"a circle number {job}"
        status, body, headers = request(s.url + "/sdapi/v1/txt2img", {"prompt": prompt, "seed": seed, **GEN},
                                        timeout=120)
        return job, seed, prompt, status, body, headers

    def client(c: int):
        return [one(c * PER_CLIENT + k) for k in range(PER_CLIENT)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
    wall = time.perf_counter() - t0
    rss_after = s.rss_kib()

    assert len(results) == CLIENTS * PER_CLIENT and sorted(r[0] for r in results) == list(range(40))  # none lost
    ok = refused = 0
    for job, seed, prompt, status, body, headers in results:
        if status == 503:
            retry = {k.lower(): v for k, v in headers.items()}.get("retry-after")
            assert retry is not None and retry.isdigit() and int(retry) > 0, (job, headers)
            refused += 1
            continue
        assert status == 200, (job, status, body)
        info = json.loads(body["info"])
        assert info["all_seeds"] == [seed] and info["seed"] == seed, (job, info["all_seeds"])
        assert info["prompt"] == prompt and info["all_prompts"] == [prompt], (job, info["prompt"])
        image = png(body["images"][0])
        assert image.size == (64, 64)
        assert image.info["parameters"].startswith(prompt + "\n") and f"Seed: {seed}," in image.info["parameters"]
        ok += 1
    print(f"\nload: {ok} answered, {refused} refused (503) of {len(results)} in {wall:.1f} s; server VmRSS "
          f"{rss_before / 1024:.1f} MB after warm-up, {rss_after / 1024:.1f} MB after the load "
          f"({(rss_after - rss_before) / 1024:+.1f} MB)")
    # the first QUEUE submissions always fit in the empty queue; 20 clients arrive within ~0.1 s while one job
    # takes ~0.5 s, so more than QUEUE + 1 are waiting at once and some must be refused
    assert ok >= QUEUE and refused >= 1, (ok, refused)
    # Flat memory: after the warm-up the model and the per-image buffers are allocated; under load the server
    # also holds up to 20 request bodies and 9 queued jobs' responses (a few 100 kB each) and glibc keeps the
    # freed arenas of the threads that served them (up to 8 x 2 cores arenas of a few MB). 150 MB is well above
    # that and well below what keeping each of the 40 results' tensors (a leak) would grow to over longer runs.
    assert (rss_after - rss_before) / 1024 < RSS_GROWTH_LIMIT_MB


# -- SIGTERM ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """Start a server with --output-dir, save one image, start a 400-step saving request, and once it has taken a
    step send SIGTERM; what happened is checked by the tests below (one run, two verdicts)."""
    out = tmp_path_factory.mktemp("sigterm") / "out"
    out.mkdir()
    with running_server("--output-dir", out) as s:
        status, body, _ = s.post("/sdapi/v1/txt2img", {"prompt": "a circle", "seed": 1, "steps": 4,
                                                       "save_images": True})
        assert status == 200, body
        saved_before = sorted(p.name for p in out.glob("*.png"))
        long = {"prompt": "a square", "seed": 2, "steps": 400, "save_images": True, "width": 64, "height": 64}
        thread, box = in_thread(lambda: request(s.url + "/sdapi/v1/txt2img", long, timeout=60))
        wait_for(lambda: s.get("/sdapi/v1/progress?skip_current_image=true")[1]["progress"] > 0, 60,
                 "the long job to start")
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        try:
            code = s.proc.wait(15)  # the job stops at its next step (~0.05 s); uvicorn then closes in under 1 s
        except Exception:  # noqa: BLE001 - recorded; the harness kills it
            code = None
        exited_after = time.monotonic() - t0
        thread.join(15)
        return dict(out=out, saved_before=saved_before, code=code, exited_after=exited_after, box=box,
                    stderr=s.stderr())


def test_sigterm_answers_the_running_request_and_leaves_no_partial_files(sigterm_run):
    r = sigterm_run
    assert r["saved_before"] and len(r["saved_before"]) == 1  # saving works, so a clean folder below means something
    assert r["code"] is not None, f"still running 15 s after SIGTERM; stderr:\n{r['stderr']}"
    assert r["code"] in (0, -signal.SIGTERM), f"exit code {r['code']}; stderr:\n{r['stderr']}"
    assert "Traceback" not in r["stderr"], r["stderr"]
    box = r["box"]
    assert "error" not in box, f"the running request got no response: {box.get('error')!r}"
    status, body, headers = box["result"]
    print(f"\nSIGTERM: the running request got {status} after {box['elapsed']:.1f} s; exit code {r['code']} "
          f"{r['exited_after']:.1f} s after the signal; output folder {sorted(p.name for p in r['out'].iterdir())}")
    assert status in (200, 503), (status, body)
    if status == 200:
        info = json.loads(body["info"])
        assert info["interrupted"] is True and info["all_seeds"] in ([], [2]), info
        assert box["elapsed"] < 15, box["elapsed"]  # 400 steps take ~20 s: it was cut short
    else:
        assert "retry-after" in {k.lower() for k in headers}
    left = sorted(p.name for p in r["out"].iterdir())
    assert not [n for n in left if n.endswith(".tmp") or n.startswith(".")], left
    for path in r["out"].iterdir():  # whatever is there is a whole PNG
        with Image.open(path) as im:
            im.load()


def test_sigterm_exit_code_is_zero(sigterm_run):
    assert sigterm_run["code"] == 0, f"exit code {sigterm_run['code']} after {sigterm_run['exited_after']:.1f} s"

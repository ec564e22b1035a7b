"""`sdtorch serve` in process (FastAPI's TestClient) on the built-in model: A1111's endpoints against the generation
layer, inpainting, bad input, folder confinement, the API key, the queue, progress, interrupt and skip."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from sdtorch import generation, infotext
from sdtorch.lora.adapters import create_network, network_weights, targets
from sdtorch.lora.formats import write_lora
from sdtorch.server import ServerConfig, Service, create_app
from sdtorch.server.jobs import Busy, Worker

PROMPT = "a large red circle in the center on a white background"


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A models folder with a tiny single file, a LoRA folder with one LoRA for the shapes model, and a file outside
    both that a symlink inside each points to."""
    root = tmp_path_factory.mktemp("serve")
    models, loras, outside = root / "models", root / "loras", root / "outside"
    for d in (models, loras, outside):
        d.mkdir()
    import sdtorch

    sdtorch.build("tiny").save_single_file(models / "tiny.safetensors")
    shapes = sdtorch.load("shapes")
    net = create_network(shapes, targets(shapes), rank=4, alpha=4.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)  # up weights start at zero; non-zero ones make the LoRA change the image
    write_lora(loras / "mine.safetensors", network_weights(net))
    (outside / "secret.safetensors").write_bytes((loras / "mine.safetensors").read_bytes())
    (models / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (loras / "link.safetensors").symlink_to(outside / "secret.safetensors")
    return models, loras, outside


@pytest.fixture(scope="module")
def client(folders):
    models, loras, _ = folders
    config = ServerConfig(models_dir=models, lora_dir=loras, queue_size=2)
    with TestClient(create_app(config)) as c:
        yield c


def post(client, path, **body):
    return client.post(path, json=body)


def test_txt2img_is_the_generation_layers_image(client):
    r = post(client, "/sdapi/v1/txt2img", prompt=PROMPT, seed=11, batch_size=2)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"}
    info = json.loads(out["info"])
    assert info["all_seeds"] == [11, 12] and info["seed"] == 11 and info["prompt"] == PROMPT
    assert (info["steps"], info["cfg_scale"], info["sampler_name"], info["width"]) == (10, 1.5, "DPM++ 2M", 64)
    service = client.app.state.service
    origin = infotext.Origin(model="shapes", model_hash=service.model_hash)
    want = generation.generate(service.model, generation.resolve(PROMPT, service.model, seed=11, batch_size=2),
                               origin=origin)
    for i, data in enumerate(out["images"]):
        png = Image.open(io.BytesIO(base64.b64decode(data)))
        assert png.size == (64, 64) and png.info["parameters"] == info["infotexts"][i] == want.parameters[i]
        # the same computation in the same process: bit-identical pixels
        assert np.array_equal(pixels(data), np.asarray(want.pil()[i]))


def test_fields_left_out_and_n_iter(client):
    info = json.loads(post(client, "/sdapi/v1/txt2img", prompt=PROMPT, batch_size=2, n_iter=2).json()["info"])
    seeds = info["all_seeds"]
    assert len(seeds) == 4 and seeds == list(range(seeds[0], seeds[0] + 4)), "seed -1: a random one, then + i"
    assert all(f"Seed: {s}," in t for s, t in zip(seeds, info["infotexts"]))
    body = post(client, "/sdapi/v1/txt2img", prompt=PROMPT, steps=3, cfg_scale=2.0, sampler_name="Euler",
                scheduler="karras", seed=1).json()
    text = json.loads(body["info"])["infotexts"][0]
    assert "Steps: 3, Sampler: Euler, Schedule type: Karras, CFG scale: 2.0" in text


def test_every_sampler_by_its_a1111_name(client):
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert names == list(infotext.A1111_NAMES.values())
    for name in names:
        r = post(client, "/sdapi/v1/txt2img", prompt=PROMPT, steps=3, sampler_name=name, seed=0)
        assert r.status_code == 200, (name, r.text)
        assert f"Sampler: {name}," in json.loads(r.json()["info"])["infotexts"][0]
    legacy = post(client, "/sdapi/v1/txt2img", prompt=PROMPT, steps=3, sampler_name="DPM++ 2M Karras", seed=0)
    assert "Schedule type: Karras" in json.loads(legacy.json()["info"])["infotexts"][0]


def test_img2img_and_inpainting_keep_what_the_mask_keeps(client):
    source = Image.new("RGB", (96, 80), (40, 170, 60))
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (40, 30, 60, 50))
    r = post(client, "/sdapi/v1/img2img", prompt=PROMPT, init_images=[b64png(source)], seed=2)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Denoising strength: 0.75, Mode: img2img" in info["infotexts"][0] and info["width"] == 96
    assert r.json()["parameters"]["init_images"] is None, "A1111 leaves the init images out unless asked"
    src = np.asarray(source)
    for full_res in (False, True):
        r = post(client, "/sdapi/v1/img2img", prompt=PROMPT, init_images=[b64png(source)], mask=b64png(mask),
                 mask_blur=0, inpaint_full_res=full_res, inpaint_full_res_padding=4, inpainting_fill=1, seed=2)
        assert r.status_code == 200, r.text
        out = pixels(r.json()["images"][0])
        assert out.shape == src.shape
        keep = np.asarray(mask) == 0
        assert np.array_equal(out[keep], src[keep]), "outside the mask the source's own pixels (A1111's overlay)"
        assert np.abs(out[~keep].astype(int) - src[~keep]).max() > 30, "inside it, something new"
        assert "Mode: inpaint" in json.loads(r.json()["info"])["infotexts"][0]


def bomb() -> str:
    """A real 8x8 PNG whose IHDR (and CRC) claims 50000x50000: a decompression-bomb header."""
    data = bytearray(base64.b64decode(b64png(Image.new("RGB", (8, 8)))))
    data[16:24] = (50000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return base64.b64encode(bytes(data)).decode()


BAD = [  # (path, body or raw bytes, status, a fragment of the detail)
    ("/sdapi/v1/txt2img", b"{not json", 422, "JSON"),
    ("/sdapi/v1/txt2img", {"prompt": 3}, 422, "prompt"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": "many"}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 65}, 422, "multiples of 8"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 4096, "height": 4096}, 422, "SDTORCH_MAX_PIXELS"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 5000}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 60, "n_iter": 2}, 422, "batch size"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Nope"}, 422, "unknown sampler"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "scheduler": "Nope"}, 422, "unknown scheduler"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, 422, "hires fix"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "save_images": True}, 422, "--output-dir"),
    ("/sdapi/v1/txt2img", {"prompt": "<lora:nothere:1> x"}, 422, "unknown LoRA"),
    ("/sdapi/v1/img2img", {"prompt": "x"}, 422, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["%%%"]}, 422, "base64"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(b"hello").decode()]}, 422, "not an image"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [bomb()]}, 422, "pixels"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [b64png(Image.new("RGB", (64, 64)))],
                           "mask": b64png(Image.new("L", (32, 32)))}, 422, "does not match"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [b64png(Image.new("RGB", (64, 64)))],
                           "mask": b64png(Image.new("L", (64, 64))), "mask_blur": -1}, 422, "mask_blur"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "seed": -5}, 422, "seed"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": NaN}', 422, "guidance"),  # Python's JSON reads NaN
    ("/sdapi/v1/options", {"sd_model_checkpoint": "nothere"}, 422, "unknown model"),
    ("/sdapi/v1/options", {"no_such_option": 1}, 422, "unknown option"),
    ("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 99}, 422, "CLIP_stop_at_last_layers"),
    ("/sdapi/v1/png-info", {"image": "!!"}, 422, "base64"),
]


@pytest.mark.parametrize("path,body,status,fragment", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_a_clear_4xx(client, path, body, status, fragment):
    raw = {"content": body, "headers": {"Content-Type": "application/json"}}
    r = client.post(path, **raw) if isinstance(body, bytes) else client.post(path, json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and fragment.lower() in detail.lower(), detail
    assert post(client, "/sdapi/v1/txt2img", prompt=PROMPT, steps=2).status_code == 200, "still serving"


def test_a_body_over_the_limit_is_413_before_it_is_read():
    with TestClient(create_app(ServerConfig(max_body_bytes=1000))) as c:
        r = c.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["A" * 2000]})
        assert r.status_code == 413 and "1000 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(3):
                yield b"x" * 600
        r = c.post("/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert c.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2}).status_code == 200


@pytest.mark.parametrize("name", ["../outside/secret.safetensors", "link.safetensors", "link",
                                  "/etc/passwd", "sub/../../outside/secret", "..", ""])
def test_names_never_leave_the_folders(client, folders, name):
    models, loras, outside = folders
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert titles == ["shapes", "tiny.safetensors"], "the symlink out of the folder is not listed"
    # the built-in LoRAs (sdtorch/data/loras: teal), then the folder's one file; the symlink out of it is not listed
    assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["teal", "mine"]
    assert post(client, "/sdapi/v1/options", sd_model_checkpoint=name).status_code == 422
    r = post(client, "/sdapi/v1/txt2img", prompt=f"<lora:{name}:1> x", steps=2)
    assert r.status_code == 422, r.text


def test_lora_tags_from_the_folder(client):
    plain = post(client, "/sdapi/v1/txt2img", prompt=PROMPT, seed=4).json()
    tagged = post(client, "/sdapi/v1/txt2img", prompt=f"{PROMPT} <lora:mine:0.8>", seed=4).json()
    text = json.loads(tagged["info"])["infotexts"][0]
    assert "<lora:mine:0.8>" in text and "Lora hashes: " in text
    assert not np.array_equal(pixels(plain["images"][0]), pixels(tagged["images"][0]))
    assert client.app.state.service.model.loras == {}, "unloaded after the request"
    again = post(client, "/sdapi/v1/txt2img", prompt=PROMPT, seed=4).json()
    assert np.array_equal(pixels(plain["images"][0]), pixels(again["images"][0]))


def test_switching_models_among_the_folders(client):
    assert post(client, "/sdapi/v1/options", sd_model_checkpoint="tiny.safetensors").status_code == 200
    try:
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny.safetensors"
        r = post(client, "/sdapi/v1/txt2img", prompt="x", steps=2, width=32, height=32, seed=0)
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["sd_model_name"] == "tiny.safetensors"
    finally:
        assert post(client, "/sdapi/v1/options", sd_model_checkpoint="shapes").status_code == 200
    assert client.get("/sdtorch/v1/model").json()["name"] == "shapes"


def _in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    return t, out


def _wait_for_steps(client, least: int = 1, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = client.get("/sdapi/v1/progress").json()
        if p["state"]["sampling_step"] >= least:
            return p
        time.sleep(0.02)
    raise AssertionError("the job never reported a step")


def test_progress_interrupt_and_skip(client):
    t, out = _in_thread(lambda: post(client, "/sdapi/v1/txt2img", prompt=PROMPT, steps=400, seed=5))
    p = _wait_for_steps(client, 3)
    assert 0 < p["progress"] < 1 and p["state"]["job_count"] == 1 and p["state"]["sampling_steps"] == 400
    p = _wait_for_steps(client, p["state"]["sampling_step"] + 2)  # a preview is decoded once a client asks
    assert p["current_image"] is None or Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).size == (64, 64)
    assert post(client, "/sdapi/v1/interrupt").json() == {}
    t.join(60)
    info = json.loads(out["r"].json()["info"])
    assert info["interrupted"] is True and len(info["all_seeds"]) == 1
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0, "idle again"

    t, out = _in_thread(lambda: post(client, "/sdapi/v1/txt2img", prompt=PROMPT, steps=80, seed=5, batch_size=2))
    _wait_for_steps(client, 2)
    post(client, "/sdapi/v1/skip")
    t.join(60)
    info = json.loads(out["r"].json()["info"])
    assert info["all_seeds"] == [5, 6] and info["interrupted"] is False, "skip ends one image, not the job"


def test_a_full_queue_is_503_with_retry_after(client):
    worker = client.app.state.service.worker
    release = threading.Event()
    running = threading.Event()
    first = worker.submit(lambda w: (running.set(), release.wait(30)))
    running.wait(10)
    queued = [worker.submit(lambda w: release.wait(30)) for _ in range(worker.queue.maxsize)]
    try:
        r = post(client, "/sdapi/v1/txt2img", prompt=PROMPT, steps=2)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
        assert client.get("/sdapi/v1/progress").status_code == 200, "/progress answers while a job runs"
    finally:
        release.set()
    for f in [first, *queued]:
        f.result(30)


def test_worker_refuses_past_its_queue_and_stops_cleanly():
    w = Worker(1)
    gate = threading.Event()
    a = w.submit(lambda _: gate.wait(10))
    time.sleep(0.1)
    b = w.submit(lambda _: "ran")
    with pytest.raises(Busy):
        w.submit(lambda _: None)
    gate.set()
    assert a.result(10) is True and b.result(10) == "ran"
    w.stop(10)
    assert not w.thread.is_alive()


def test_api_key_guards_every_endpoint_but_the_page(folders):
    config = ServerConfig(api_key="s3cret")
    with TestClient(create_app(config)) as c:
        for path in ("/sdapi/v1/samplers", "/sdapi/v1/options", "/docs", "/openapi.json"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        basic = base64.b64encode(b"anyone:s3cret").decode()
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        assert c.get("/").status_code == 200, "the page loads and asks for the key"


def test_save_images_and_png_info(tmp_path):
    service = Service(ServerConfig(output_dir=tmp_path / "out"))
    with TestClient(create_app(service.config, service)) as c:
        r = post(c, "/sdapi/v1/txt2img", prompt=PROMPT, seed=9, save_images=True, batch_size=2)
        assert r.status_code == 200, r.text
        files = sorted(p.name for p in Path(tmp_path / "out").iterdir())
        assert len(files) == 2 and all(f.endswith("-9.png") or f.endswith("-10.png") for f in files), files
        info = post(c, "/sdapi/v1/png-info", image=r.json()["images"][0]).json()
        assert info["parameters"]["Seed"] == "9" and info["parameters"]["Size-1"] == "64"
        assert info["info"] == json.loads(r.json()["info"])["infotexts"][0]

"""The HTTP routes: AUTOMATIC1111's /sdapi/v1 endpoints, sdtorch's /sdtorch/v1/model, and the web page at /.

Routes only translate: a body is checked by `Service.prepare` in a worker thread of the event loop's pool,
queued, and awaited, so the loop itself never runs a model. Every failure a client can cause is a 4xx with
{"detail": one line}; a full queue is 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from .. import __version__, images
from ..errors import SDTorchError
from ..infotext import A1111_NAMES
from . import a1111
from .jobs import Busy, Stopped
from .service import ServerConfig, Service

STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = 5
log = logging.getLogger("sdtorch.server")


def _authorized(header: str | None, key: str) -> bool:
    """`Authorization: Bearer KEY`, or HTTP Basic with KEY as the password (A1111 clients' --api-auth), compared in
    constant time."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8"), key.encode("utf-8"))


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413, as soon as its Content-Length or the
    bytes received so far say so; a body within it is read once and handed on whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _too_large(self.limit, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _too_large(self.limit, send)
            more = message.get("more_body", False)
        body, given = b"".join(chunks), False

        async def replay():
            nonlocal given
            if given:
                return await receive()
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, replay, send)


async def _too_large(limit: int, send) -> None:
    response = JSONResponse({"detail": f"the request body is over the limit of {limit} bytes"}, 413)
    await response({"type": "http"}, None, send)


def create_app(config: ServerConfig | None = None, service: Service | None = None) -> FastAPI:
    """The FastAPI app of `sdtorch serve`. It loads the model (or uses `service`) at once."""
    config = config or ServerConfig()
    service = service or Service(config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="sdtorch", version=__version__, lifespan=lifespan,
                  description="AUTOMATIC1111-compatible API of sdtorch (https://github.com/AUTOMATIC1111/"
                  "stable-diffusion-webui/wiki/API), and a web page at /.")
    app.state.service = service
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        path = request.url.path
        public = path in ("/", "/favicon.ico") or path.startswith("/static/")  # the page holds no data: it asks
        if config.api_key and not public and not _authorized(request.headers.get("authorization"), config.api_key):
            return JSONResponse({"detail": "missing or wrong API key (send Authorization: Bearer KEY)"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(SDTorchError)
    async def sdtorch_error(request: Request, e: SDTorchError):
        if isinstance(e, (Busy, Stopped)):
            return JSONResponse({"detail": str(e)}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"detail": str(e)}, 422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = [{"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
                  for err in e.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(x) for x in first["loc"] if x != "body") or "body"
        return JSONResponse({"detail": f"{where}: {first['msg']}", "errors": errors}, 422)

    async def generate(body) -> dict:
        prepared = await run_in_threadpool(service.prepare, body)
        future = service.worker.submit(lambda worker: service.run(prepared, worker))
        return await asyncio.wrap_future(future)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: a1111.Txt2ImgRequest) -> dict:
        return await generate(body)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: a1111.Img2ImgRequest) -> dict:
        return await generate(body)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> dict:
        if not skip_current_image:
            service.worker.want_preview()
        p = service.worker.snapshot()
        fraction = p.fraction()
        elapsed = time.time() - p.started if p.started else 0.0
        return {
            "progress": fraction, "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,
            "state": {"skipped": p.skipped, "interrupted": p.interrupted, "stopping_generation": False,
                      "job": p.job, "job_count": p.job_count, "job_timestamp": p.job_timestamp,
                      "job_no": p.job_no, "sampling_step": p.sampling_step, "sampling_steps": p.sampling_steps,
                      "queued": service.worker.pending()},
            "current_image": None if skip_current_image or p.preview is None else a1111.encode_png(p.preview),
            "textinfo": p.textinfo, "current_task": None,
        }

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict:
        service.worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> dict:
        service.worker.skip()
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list:
        return a1111.sampler_list()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list:
        return [{"name": name, "label": name.capitalize(), "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for name in a1111.SCHEDULERS]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list:
        return [{"title": e.title, "model_name": e.stem, "filename": str(e.path), "config": None, "sha256": None,
                 "hash": service.model_hash if e.title == service.entry.title else None} for e in service.models]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> dict:
        await run_in_threadpool(service.refresh_models)
        return {}

    @app.get("/sdapi/v1/loras")
    async def loras() -> list:
        return await run_in_threadpool(lambda: [{"name": e.title, "alias": e.title, "path": str(e.path),
                                                 "metadata": _metadata(e.path)} for e in service.loras])

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras() -> dict:
        await run_in_threadpool(service.refresh_loras)
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict:
        return {"sd_model_checkpoint": service.entry.title, "sd_checkpoint_hash": None,
                "CLIP_stop_at_last_layers": service.clip_skip, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict) -> dict:
        known = {"sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_checkpoint_hash", "samples_format"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise SDTorchError(f"unknown option {unknown[0]!r}; sdtorch has: {', '.join(sorted(known))}")
        if body.get("samples_format", "png") != "png":
            raise SDTorchError("samples_format: sdtorch writes png only")
        if "CLIP_stop_at_last_layers" in body:
            value = body["CLIP_stop_at_last_layers"]
            if service.model.config.text is None:
                raise SDTorchError(f"CLIP_stop_at_last_layers: the model is {service.model.config.unet.conditioning}-"
                                   "conditioned and has no text encoder")
            layers = service.model.config.text.layers
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= layers:
                raise SDTorchError(f"CLIP_stop_at_last_layers must be an integer from 1 to {layers}, got {value!r}")
        if "sd_model_checkpoint" in body:
            future = service.switch_model(body["sd_model_checkpoint"])
            if future is not None:
                await asyncio.wrap_future(future)
        if "CLIP_stop_at_last_layers" in body:
            service.clip_skip = body["CLIP_stop_at_last_layers"]
        return {}

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: dict) -> dict:
        def read():
            data = a1111.decode_image(body.get("image"), "image")
            return a1111.png_info(images.text_chunks(data, "image", config.limits.max_image_pixels))
        return await run_in_threadpool(read)

    @app.get("/sdtorch/v1/model")
    async def model_info() -> dict:
        m = service.model
        d = a1111.defaults_for(m)
        return {"name": service.entry.title, "width": m.config.sample_size, "height": m.config.sample_size,
                "steps": d["steps"], "cfg_scale": d["guidance"], "sampler_name": A1111_NAMES[d["sampler"]]}

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def page():
            return FileResponse(STATIC / "index.html")

    return app


def _metadata(path: Path) -> dict:
    """A LoRA file's safetensors metadata (kohya's ss_* keys), or {} if it has none or cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - a listing must not fail on one bad file
        return {}

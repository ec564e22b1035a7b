"""`sdtorch serve`: the HTTP API and web page (sdtorch.server) on uvicorn."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

from ..errors import SDTorchError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _folder(value: str | None, what: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise SDTorchError(f"{what} {value!r} is not a folder")
    return path


def serve(args) -> None:
    import uvicorn

    from ..generation import Limits
    from ..lora.adapters import lora_dir
    from ..server import ServerConfig, Service, create_app
    from ..precision import default_device

    limits = Limits.from_env()
    changes = {k: getattr(args, k) for k in ("max_pixels", "max_steps", "max_batch") if getattr(args, k) is not None}
    limits = dataclasses.replace(limits, **changes)
    if not 1 <= args.port <= 65535:
        raise SDTorchError(f"--port must be from 1 to 65535, got {args.port}")
    key = args.api_key or os.environ.get("SDTORCH_API_KEY") or None
    loras = _folder(args.lora_dir, "--lora-dir") if args.lora_dir else (lora_dir() if lora_dir().is_dir() else None)
    output = Path(args.output_dir).expanduser() if args.output_dir else None
    config = ServerConfig(model=args.model, models_dir=_folder(args.models_dir, "--models-dir"), lora_dir=loras,
                          output_dir=output, queue_size=args.queue_size, api_key=key, limits=limits,
                          max_body_bytes=args.max_body_mb << 20, dtype=args.dtype,
                          device=args.device or default_device())
    if args.host not in LOOPBACK and not key:
        print(f"sdtorch: warning: serving on {args.host} without --api-key: anyone who can reach this machine can "
              "use it", file=sys.stderr)
    service = Service(config)
    app = create_app(config, service)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGINT/SIGTERM: interrupt the running job, refuse the queued ones
            service.worker.shutdown()
            super().handle_exit(sig, frame)

    # uvicorn re-raises SIGTERM after its graceful shutdown, into the handler it found: this one ends with code 0
    signal.signal(signal.SIGTERM, _exit_cleanly)
    print(f"sdtorch serve: http://{args.host}:{args.port}/ (model {service.entry.title}; API at /sdapi/v1, "
          f"schema at /docs)", file=sys.stderr, flush=True)
    Server(uvicorn.Config(app, host=args.host, port=args.port,
                          log_level=args.log_level, lifespan="on")).run()


def _exit_cleanly(sig, frame) -> None:
    raise SystemExit(0)


def add_commands(sub) -> None:
    from ..generation import ENV_HELP

    p = sub.add_parser("serve", help="an AUTOMATIC1111-compatible HTTP API and a web page", epilog=ENV_HELP)
    p.add_argument("--model", "-m", default="shapes", help="the model at start: a title in --models-dir, a "
                   "built-in name, or a path (default: shapes)")
    p.add_argument("--models-dir", help="the folder of models a client may switch to (sd_model_checkpoint); "
                   "nothing outside it can be named (default: the built-in models only)")
    p.add_argument("--lora-dir", help="the folder of LoRAs a prompt may name with <lora:NAME:W> (default: "
                   "$SDTORCH_LORAS, else ~/.local/share/sdtorch/loras, if it exists)")
    p.add_argument("--output-dir", help="where images are saved when a request sets save_images (default: none; "
                   "such requests are refused)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this "
                   "machine only)")
    p.add_argument("--port", type=int, default=7860, help="(default: 7860, as A1111)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every API call (default: "
                   "$SDTORCH_API_KEY; none: no key)")
    p.add_argument("--queue-size", type=int, default=8, help="jobs that may wait behind the running one; more are "
                   "answered 503 with Retry-After (default: 8)")
    p.add_argument("--max-pixels", type=int, help="the largest width x height a request may ask for (default: "
                   "$SDTORCH_MAX_PIXELS)")
    p.add_argument("--max-steps", type=int, help="the most sampler steps (default: $SDTORCH_MAX_STEPS)")
    p.add_argument("--max-batch", type=int, help="the most images per request, batch_size x n_iter (default: "
                   "$SDTORCH_MAX_BATCH)")
    p.add_argument("--max-body-mb", type=int, default=64, help="the largest request body in MiB (default: 64)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="compute dtype (default: auto, as for `sdtorch generate`)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda where a GPU is visible, else cpu)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: warning)")
    p.set_defaults(func=serve)

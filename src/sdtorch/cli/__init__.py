"""The `sdtorch` command line. Failures a user can fix end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .. import __version__
from ..config import PRESETS
from ..errors import SDTorchError
from ..fileio import shown


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="architecture of a single file: a preset name or a diffusers folder "
                   "(default: detected from its tensors and metadata)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="the model's prediction type (default: detected)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="load in this dtype (default: the file's)")
    p.add_argument("--ema", action="store_true",
                   help="use the UNet's EMA weights of an original checkpoint (default: off)")
    p.add_argument("--partial", action="store_true",
                   help="load what matches instead of failing on mismatches (default: off)")


def _load(args):
    from .. import pipeline

    if pipeline.builtin_path(args.model) is not None:
        return pipeline.load(args.model, dtype=args.dtype)
    if args.model.lower() in PRESETS and not Path(args.model).exists():
        return pipeline.build(args.model, device="meta")  # architecture only: allocates nothing
    return pipeline.load(args.model, dtype=args.dtype, prediction_type=args.prediction_type, config=args.config,
                         use_ema=args.ema, strict=not args.partial)


def cmd_info(args) -> None:
    model = _load(args)
    print(model.summary())
    if model.report is not None:
        print(model.report)


def cmd_convert(args) -> None:
    from .. import checkpoints
    from ..pipeline import GENERATION_DEFAULTS, check_defaults

    dst = _convert_destination(args.output)
    defaults = {k: getattr(args, f"default_{k}") for k in GENERATION_DEFAULTS
                if getattr(args, f"default_{k}") is not None}
    if defaults and dst.suffix.lower() == ".safetensors":
        raise SDTorchError(f"{shown(dst)}: generation defaults are kept in diffusers folders only; write a folder")
    model = _load(args)
    if model.report is None:
        raise SDTorchError(f"{args.model}: a preset has no weights to convert; give a checkpoint")
    model.defaults = check_defaults({**model.defaults, **defaults}, "convert")
    if args.vae is not None:
        model.use_vae(checkpoints.load_vae(args.vae))
    if dst.suffix.lower() == ".safetensors":
        model.save_single_file(dst, dtype=args.save_dtype)
    else:
        model.save_diffusers(dst, dtype=args.save_dtype)
    print(f"wrote {dst}")


def _describe(path: Path) -> tuple[str, str, str]:
    """(family, prediction type, size) of a diffusers folder or `.safetensors` file, read cheaply: a folder's
    JSON configs, or a file's header (tensor names, shapes, metadata) without reading any weights. An SD 2
    file that does not record its prediction type is probed only when loaded, so it shows as "at load"."""
    from ..checkpoints import detect, diffusers_folder, read_state_dict

    if path.is_dir():
        c = diffusers_folder.read_config(path)
        return c.family, c.prediction_type, f"{c.sample_size}x{c.sample_size}"
    sd = read_state_dict(path)
    family = detect.detect_family(sd)
    config = detect.config_from_metadata(sd.metadata, str(path)) or detect.infer_config(sd, family)
    prediction = detect.prediction_from_metadata(sd.metadata) or ("epsilon" if family == "sd1" else "at load")
    return family, prediction, f"{config.sample_size}x{config.sample_size}"


def cmd_models(args) -> None:
    """One line per built-in model, then per model in the user's folder (--dir, else $SDTORCH_MODELS)."""
    from ..checkpoints.diffusers_folder import is_diffusers_folder
    from ..pipeline import BUILTIN, builtin_path

    rows = [("NAME", "FAMILY", "PREDICTION", "SIZE", "WHERE")]
    for name in BUILTIN:
        path = builtin_path(name)
        rows.append((name, *(_describe(path) if path else ("-", "-", "-")), "built-in" if path else "not installed"))
    folder = args.dir or os.environ.get("SDTORCH_MODELS")
    if folder:
        if not Path(folder).is_dir():
            given = "--dir" if args.dir else "SDTORCH_MODELS"
            raise SDTorchError(f"{shown(folder)}: no such models folder (given by {given})")
        for path in sorted(Path(folder).iterdir()):
            if not (path.suffix.lower() == ".safetensors" and path.is_file() or is_diffusers_folder(path)):
                continue
            try:
                rows.append((path.name, *_describe(path), shown(path.parent)))
            except SDTorchError as e:  # one unreadable file does not hide the others
                rows.append((path.name, "?", "?", "?", f"unreadable: {e}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[4])
    if not folder:
        print("(set SDTORCH_MODELS or pass --dir to list your own models too)")


USAGE = f"""usage: sdtorch COMMAND [options]       (sdtorch COMMAND --help for its options)

common commands:
  sdtorch generate "a large red circle in the center on a white background"   text to image (built-in model)
  sdtorch img2img IMAGE PROMPT --model MODEL     image to image
  sdtorch train DATA OUTPUT                      train a UNet on a folder of images with captions

sdtorch models lists the models; sdtorch --help lists every command; sdtorch {__version__}.
"""


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def _convert_destination(output: str) -> Path:
    """`convert`'s destination, checked before the model loads: NAME.safetensors (a file there is replaced)
    or a folder (an existing one is replaced whole only when it is empty or a diffusers model folder)."""
    from ..checkpoints import check_model_destination
    from ..fileio import check_file_destination

    dst = Path(output)
    suffix = dst.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise SDTorchError(f"{shown(dst)}: write a .safetensors file or a folder (pickles like {suffix} are unsafe)")
    if suffix == ".safetensors":
        return check_file_destination(dst)
    if suffix:
        raise SDTorchError(f"{shown(dst)}: unknown extension {suffix!r}; write NAME.safetensors or a folder name "
                           "without an extension")
    if dst.is_file():
        raise SDTorchError(f"{shown(dst)}: exists and is a file; give NAME.safetensors or a folder name")
    return check_model_destination(dst)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag ends in the same one line as every other error (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"sdtorch: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdtorch", description="Stable Diffusion in readable PyTorch.")
    parser.add_argument("--version", action="version", version=f"sdtorch {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("info", help="describe a checkpoint, diffusers folder or preset")
    p.add_argument("model", help=f"a .safetensors/.ckpt file, a diffusers folder, or a preset ({', '.join(PRESETS)})")
    _add_load_flags(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert between original single files and diffusers folders")
    p.add_argument("model", help="source: a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("output", help="destination: NAME.safetensors (original layout; a file there is replaced) or a "
                   "folder (diffusers layout; an existing folder is replaced whole, and only if it is empty or a "
                   "diffusers model folder with model_index.json). Nothing is written unless it is complete")
    p.add_argument("--save-dtype", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the written weights (default: as loaded)")
    p.add_argument("--default-steps", type=int, help="the folder's recommended steps, kept in generation_defaults.json "
                   "(default: the source's, if any)")
    p.add_argument("--default-guidance", type=float,
                   help="the folder's recommended guidance scale (default: the source's, if any)")
    p.add_argument("--default-sampler", help="the folder's recommended sampler (default: the source's, if any)")
    p.add_argument("--vae", help="bake in this autoencoder instead (an AutoencoderKL folder or a model's) "
                   "(default: the model's own)")
    _add_load_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("models", help="list the built-in models and those in your models folder")
    p.add_argument("--dir", help="your models folder: its .safetensors files and diffusers folders are listed "
                   "(default: $SDTORCH_MODELS)")
    p.set_defaults(func=cmd_models)

    from . import generate, lora, serve, shapes, train

    generate.add_commands(sub)
    lora.add_commands(sub)
    train.add_commands(sub)
    shapes.add_commands(sub)
    serve.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. With none, print a short usage and exit 0, as pip does: asking what sdtorch can do
    is not an error (git exits 1 there, but 2 is this CLI's code for a one-line error). A Python warning
    (an unknown prompt word, an untrained size) prints as one line `sdtorch: warning: ...` on stderr."""
    args = build_parser().parse_args(argv)
    if args.command is None:
        print(USAGE, end="")
        return 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_, **__: print(f"sdtorch: warning: {message}", file=sys.stderr)
            args.func(args)
    except SDTorchError as e:
        print(f"sdtorch: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the system refused (disk full, permissions): its message names the file
        print(f"sdtorch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtorch: interrupted", file=sys.stderr)
        return 130
    return 0

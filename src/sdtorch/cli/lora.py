"""`sdtorch lora-info | convert-lora | merge-lora`: inspect, convert and bake in LoRA files."""

from __future__ import annotations

import json

from ..errors import SDTorchError
from ..fileio import shown


def lora_info(args) -> None:
    from ..lora.adapters import find_lora
    from ..lora.formats import lora_info as info

    found = info(find_lora(args.file, args.lora_dir))
    if args.json:
        print(json.dumps(found, indent=2, sort_keys=True, default=str))
        return
    print(f"file:     {found['path']}")
    print(f"format:   {found['format']}")
    print(f"family:   {found['family']}")
    print(f"kinds:    {_counts(found['kinds'])}")
    print(f"ranks:    {_counts(found['ranks'])}")
    print(f"alphas:   {_counts({'none (= rank)' if k is None else k: v for k, v in found['alphas'].items()})}")
    c = found["counts"]
    print(f"adapters: {c['adapters']} ({c['tensors']} tensors, {c['unknown']} not read)")
    for part, kinds in found["targets"].items():
        modules = found["modules"][part]
        print(f"{part}: {_counts(kinds)} modules, e.g. {', '.join(modules[:3])}")
    for key in found["unknown_keys"][:5]:
        print(f"not read: {key}")
    for key, value in sorted(found["metadata"].items()):
        value = value if len(value) <= 100 else value[:97] + "..."
        print(f"metadata {key}: {value}")


def _counts(d: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in d.items()) or "-"


def convert_lora(args) -> None:
    from ..lora.adapters import find_lora
    from ..lora.formats import convert_lora as convert
    from ..pipeline import load

    if args.to not in ("kohya", "peft"):
        raise SDTorchError(f"--to {args.to!r}: write kohya or peft")
    src = find_lora(args.input, args.lora_dir)
    model = load(args.model) if args.model else None
    print(f"wrote {shown(convert(src, args.output, args.to, model=model))}")


def merge_lora(args) -> None:
    from . import _convert_destination, _load
    from ..lora.prompt import find_flag

    if not args.items[:-1]:
        raise SDTorchError("merge-lora needs MODEL, at least one LORA and OUT")
    *loras, output = args.items
    dst = _convert_destination(output)
    refs = [find_flag(text, args.lora_dir)[0] for text in loras]  # every file found before the model loads
    model = _load(args)
    if model.report is None:
        raise SDTorchError(f"{args.model}: a preset has no weights to merge into; give a checkpoint")
    for i, ref in enumerate(refs):
        report = model.load_lora(ref.source, ref.scale, name=f"{i}:{ref.source.stem}", partial=args.lora_partial)
        print(f"LoRA {shown(ref.source)}: {report.summary()}")
    model.merge_lora()
    if dst.suffix.lower() == ".safetensors":
        model.save_single_file(dst, dtype=args.save_dtype)
    else:
        model.save_diffusers(dst, dtype=args.save_dtype)
    print(f"wrote {dst}")


def add_commands(sub) -> None:
    from . import _add_load_flags

    p = sub.add_parser("lora-info", help="describe a LoRA file: format, family, ranks, alphas, targets, metadata")
    p.add_argument("file", help="a LoRA .safetensors (kohya/A1111, LyCORIS or diffusers/PEFT), or a weights-only .pt; "
                   "or a LoRA name, as for --lora: a built-in one (teal) or one in the LoRA folder")
    p.add_argument("--json", action="store_true", help="print everything as JSON (default: a summary)")
    _add_lora_dir(p)
    p.set_defaults(func=lora_info)

    p = sub.add_parser("convert-lora", help="rewrite a LoRA in kohya or PEFT format, losslessly")
    p.add_argument("input", help="the LoRA file, or a LoRA name (built-in, or in the LoRA folder)")
    p.add_argument("output", help="NAME.safetensors (a file there is replaced; nothing is written on failure)")
    p.add_argument("--to", required=True, metavar="{kohya,peft}", help="the format to write (required)")
    p.add_argument("--model", "-m", help="resolve the names against this model (default: the presets of the "
                   "file's family)")
    _add_lora_dir(p)
    p.set_defaults(func=convert_lora)

    p = sub.add_parser("merge-lora", help="write a checkpoint with LoRAs folded into its weights",
                       usage="sdtorch merge-lora MODEL LORA[:SCALE] [LORA[:SCALE] ...] OUT [options]")
    p.add_argument("model", help="a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("items", nargs="*", metavar="LORA[:SCALE] ... OUT",
                   help="LoRA files or names (SCALE after the last ':' if it is a number, default 1), then the "
                   "destination, as for `sdtorch convert`: NAME.safetensors or a folder (diffusers layout)")
    p.add_argument("--save-dtype", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the written weights (default: as loaded)")
    _add_lora_dir(p)
    p.add_argument("--lora-partial", action="store_true", help="merge a LoRA that only partly matches the model, "
                   "with a warning, instead of failing (default: off)")
    _add_load_flags(p)
    p.set_defaults(func=merge_lora)


def _add_lora_dir(p) -> None:
    p.add_argument("--lora-dir", metavar="DIR", help="where LoRA names are looked up (default: $SDTORCH_LORAS, "
                   "else ~/.local/share/sdtorch/loras)")

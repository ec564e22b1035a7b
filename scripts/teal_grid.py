"""The README's teal grid: the first teal prompts of `sdtorch eval shapes --n-teal`, drawn by the built-in
model without the LoRA (top row) and with `--lora teal` (bottom row), each framed green where the analyser
reads the prompt back exactly, red otherwise.

    python scripts/teal_grid.py docs/teal-grid.png [--model shapes] [--lora teal] [--n 8]

Each row is `evaluate_shapes` with only teal prompts (prompt i at seed i, the model's default sampler, steps and
guidance), so the grid shows the first images that evaluation grades, graded by it.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

from PIL import Image

import sdtorch
from sdtorch.evaluation import evaluate_shapes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output")
    p.add_argument("--model", default="shapes")
    p.add_argument("--lora", default="teal")
    p.add_argument("--n", type=int, default=8, help="teal prompts in each half, 8 to a row")
    args = p.parse_args()
    model = sdtorch.load(args.model)
    warnings.filterwarnings("ignore", message=".*does not know 'teal'")  # the top row asks for it on purpose
    rows, exact = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for with_lora in (False, True):
            if with_lora:
                model.load_lora(args.lora)
            out = Path(tmp) / f"lora-{with_lora}"
            report = evaluate_shapes(model, n_seen=0, n_heldout=0, n_two=0, n_teal=args.n, out_dir=out,
                                     progress=False, roundtrip=False)
            exact.append(report["splits"]["teal"]["exact"]["correct"])
            rows.append(Image.open(out / "contact_sheet.png").convert("RGB"))
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    grid.paste(rows[0], (0, 0))
    grid.paste(rows[1], (0, rows[0].height))
    grid.save(args.output)
    print(f"wrote {args.output}: exact {exact[0]}/{args.n} without the LoRA, {exact[1]}/{args.n} with it")


if __name__ == "__main__":
    main()

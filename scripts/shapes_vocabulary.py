"""Write the built-in model's prompt vocabulary: every word its captions use, taken from the shapes
grammar's own constants, so the file cannot drift from the grammar. Teal is left out: it is in no
caption (the built-in LoRA `teal` adds it, through its own vocabulary).

    python scripts/shapes_vocabulary.py [FOLDER]   # writes FOLDER/prompt_vocabulary.json (default: the package's)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sdtorch.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Obj, Scene

OUT = Path(__file__).resolve().parents[1] / "src/sdtorch/data/shapes-model/prompt_vocabulary.json"


def shapes_vocabulary() -> list[str]:
    """The grammar's words, in the order a caption uses them: its fixed words, then each slot's values."""
    slots = [*SIZES, *COLORS, *SHAPES, *(w for p in POSITIONS for w in p.split()), *BACKGROUNDS]
    caption = Scene((Obj("small", "red", "circle", "center"),) * 2, "white").caption()
    fixed = [w for w in caption.split() if w not in slots]  # a, in, the, and, on, background
    return list(dict.fromkeys([*fixed, *slots]))  # each word once, first place kept


if __name__ == "__main__":
    out = Path(sys.argv[1]) / OUT.name if len(sys.argv) > 1 else OUT
    out.write_text(json.dumps(shapes_vocabulary()) + "\n", encoding="utf-8")
    print(f"wrote {out}")

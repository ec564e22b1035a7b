"""Prompt weighting and long prompts the way AUTOMATIC1111's web UI reads them.

A prompt is parsed into runs of text with an attention weight (`parse_weights`), tokenized into
chunks of 75 tokens framed by bos/eos (`tokenize_weighted`), and each chunk is encoded by the text
encoder on its own; the chunks' hidden states are concatenated along the token axis and scaled by
the weights with the mean of each chunk restored (`encode_prompt`, `apply_weights`).

Not implemented: prompt editing `[from:to:when]`, alternation `[a|b]`, composable diffusion `AND`,
textual-inversion embeddings, and the "No norm" emphasis mode. Such text is read as plain text.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from torch import nn

from .tokenizer import CLIPTokenizer

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK_WEIGHT = -1.0  # the weight `parse_weights` gives a BREAK marker, as A1111 does
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`

_SYNTAX = re.compile(
    r"""
      \\[()\[\]\\]?              # an escape (\( \) \[ \] \\) or a lone backslash
    | [(\[]                      # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)     # an explicit weight closing a round bracket
    | [)\]]                      # a closing bracket
    | [^\\()\[\]:]+              # plain text
    | :                          # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def _float(text: str) -> float | None:
    """The number in `text`, or None where it does not parse (like "1.2.3" or ".")."""
    try:
        return float(text)
    except ValueError:
        return None


def _parse(prompt: str) -> list[tuple[str, float | None]]:
    """Runs of (text, weight), with weight None for a BREAK marker; see `parse_weights`."""
    runs: list[list] = []  # [text, weight] pairs, mutated while brackets close
    round_open: list[int] = []  # index into runs where each open bracket starts
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            if run[1] is not None:
                run[1] *= factor

    for match in _SYNTAX.finditer(prompt):
        piece, number = match.group(0), match.group(1)
        factor = _float(number) if number is not None and round_open else None
        if factor is not None:
            scale(round_open.pop(), factor)
        elif piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece in ("(", "["):
            (round_open if piece == "(" else square_open).append(len(runs))
        elif piece == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    runs.append(["BREAK", None])
                runs.append([part, 1.0])
    for start in round_open:  # unclosed brackets reach to the end of the prompt
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and run[1] is not None and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(text, weight) for text, weight in merged]


def parse_weights(prompt: str) -> list[tuple[str, float]]:
    """Split `prompt` into runs of (text, weight) by A1111's attention syntax.

    - `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1;
    - `(text:1.3)` multiplies it by 1.3 (spaces around the number are allowed; a number that does not
      parse, like `1.2.3`, is kept as text and the bracket stays open);
    - brackets nest and their factors multiply: `((text))` is 1.21;
    - `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters; a lone backslash is dropped;
    - a closing bracket with nothing open is plain text; an unclosed bracket applies to the rest;
    - the word `BREAK` (upper case, whole word, with the spaces around it) becomes the marker
      ("BREAK", -1.0), which starts a new 75-token chunk. Unlike A1111, a BREAK inside brackets is
      still a marker (A1111 multiplies its -1 and then reads the word as text);
    - adjacent runs of equal weight are merged; an empty prompt gives [("", 1.0)].
    """
    return [(text, BREAK_WEIGHT if weight is None else weight) for text, weight in _parse(prompt)]


class Chunk(NamedTuple):
    """One text-encoder row: `ids` is bos + 75 tokens + eos, padded; `weights` is parallel to it."""

    ids: list[int]
    weights: list[float]


def _frame(tokenizer: CLIPTokenizer, ids: list[int], weights: list[float]) -> Chunk:
    """bos + ids + eos, then pad to max_length; bos, eos and pad get weight 1.0."""
    fill = tokenizer.max_length - 2 - len(ids)
    return Chunk([tokenizer.bos_id, *ids, tokenizer.eos_id] + [tokenizer.pad_id] * fill,
                 [1.0, *weights] + [1.0] * (fill + 1))


def tokenize_weighted(tokenizer: CLIPTokenizer, prompt: str, comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Chunks of at most 75 weighted tokens, split as A1111 does.

    Each run of `parse_weights` is tokenized on its own. A chunk is closed when it holds 75 tokens or
    at a BREAK (a leading BREAK gives an empty first chunk, as in A1111). When a chunk is full and the
    next token is not a comma, the tokens after the chunk's last comma move to the next chunk if that
    comma is within `comma_backtrack` tokens of the end (0 turns this off: plain 75-token splits).
    A comma that itself opens a chunk is not remembered (A1111 forgets it too).
    """
    size = tokenizer.max_length - 2
    comma = tokenizer.vocab.get(",</w>")
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(_frame(tokenizer, ids, weights))
        ids, weights, last_comma = [], [], -1

    for text, weight in _parse(prompt):
        if weight is None:
            close()
            continue
        for token in tokenizer.encode(text):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == size and last_comma >= 0 and size - last_comma <= comma_backtrack:
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == size:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: z' = (z * w) * mean(z) / mean(z * w), per row of `hidden`.

    hidden: [N, T, C], weights: [N, T]. A1111 takes the means over the whole batch of a chunk index;
    here each row (one chunk of one prompt) keeps its own mean, so prompts do not affect each other.
    Rows whose weights are all 1 are returned untouched.

    The ratio of means is only meaningful where both means stand out from their rounding error. The
    states carry a relative rounding error of up to eps(dtype) each, and a float32 pairwise sum adds at
    most log2(T * C) * eps(float32) (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
    sec. 4.2), both relative to mean(|z|). A mean within that bound could be 0 or of either sign: a text
    encoder whose final LayerNorm has zero bias (any freshly initialised one) gives every token a mean of
    exactly 0, and A1111's ratio is then rounding noise over rounding noise, inf or NaN. Such a row keeps
    the weighted states unrestored (factor 1); every other row gets A1111's result.
    """
    z = hidden.float()
    weighted = z * weights.to(z)[..., None]
    _, T, C = z.shape
    tol = torch.finfo(hidden.dtype).eps + math.ceil(math.log2(T * C)) * torch.finfo(torch.float32).eps
    mean_z, mean_w = z.mean((1, 2), keepdim=True), weighted.mean((1, 2), keepdim=True)
    defined = ((mean_z.abs() > tol * z.abs().mean((1, 2), keepdim=True))
               & (mean_w.abs() > tol * weighted.abs().mean((1, 2), keepdim=True)))
    factor = torch.where(defined, mean_z / torch.where(defined, mean_w, 1.0), 1.0)
    restored = weighted * factor
    plain = (weights == 1).all(dim=1)[:, None, None]
    return torch.where(plain, hidden, restored.to(hidden.dtype))


def _encode(text_encoder: nn.Module, tokenizer: CLIPTokenizer, batch: list[list[Chunk]], clip_skip: int,
            num_chunks: int | None) -> torch.Tensor:
    """Encode each prompt's chunks, padded with empty chunks to `num_chunks` (default: the longest)."""
    if not batch:
        raise ValueError("no prompts to encode")
    k = max(map(len, batch))
    if num_chunks is not None:
        if num_chunks < k:
            raise ValueError(f"a prompt needs {k} chunks of 75 tokens, more than num_chunks={num_chunks}")
        k = num_chunks
    empty = _frame(tokenizer, [], [])
    rows = [chunk for chunks in batch for chunk in chunks + [empty] * (k - len(chunks))]
    device = next(text_encoder.parameters()).device
    ids = torch.tensor([row.ids for row in rows], dtype=torch.long, device=device)  # [B*k, T]
    weights = torch.tensor([row.weights for row in rows], dtype=torch.float32, device=device)
    hidden = apply_weights(text_encoder(ids, clip_skip=clip_skip), weights)  # [B*k, T, C]
    _, T, C = hidden.shape
    return hidden.reshape(len(batch), k * T, C)  # [B*k, T, C] -> [B, k*T, C]


def encode_prompt(text_encoder: nn.Module, tokenizer: CLIPTokenizer, prompt: str | list[str], clip_skip: int = 1,
                  num_chunks: int | None = None) -> torch.Tensor:
    """[B, 77 * k, width] weighted hidden states of k chunks per prompt (see `tokenize_weighted`).

    A plain prompt of at most 75 tokens gives exactly `text_encoder(tokenizer([prompt]), clip_skip)`.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    batch = [tokenize_weighted(tokenizer, p) for p in prompts]
    return _encode(text_encoder, tokenizer, batch, clip_skip, num_chunks)


def encode_pair(text_encoder: nn.Module, tokenizer: CLIPTokenizer, prompts: str | list[str],
                negative_prompts: str | list[str] | None = None,
                clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) with the same number of chunks, for classifier-free guidance in one batch.

    A single negative prompt (or None, meaning "") is used for every prompt; otherwise the two lists
    must be the same length.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = [""] if negative_prompts is None else negative_prompts
    negatives = [negatives] if isinstance(negatives, str) else list(negatives)
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    cond = [tokenize_weighted(tokenizer, p) for p in prompts]
    uncond = [tokenize_weighted(tokenizer, p) for p in negatives]
    k = max(map(len, cond + uncond), default=1)
    return (_encode(text_encoder, tokenizer, cond, clip_skip, k),
            _encode(text_encoder, tokenizer, uncond, clip_skip, k))

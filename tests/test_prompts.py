"""Prompt weighting and chunking (`sdtorch.prompts`) against AUTOMATIC1111's documented behaviour."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdtorch.config import TINY
from sdtorch.models import CLIPTextModel
from sdtorch.prompts import (BREAK_WEIGHT, apply_weights, encode_pair, encode_prompt, parse_weights,
                             tokenize_weighted)
from sdtorch.tokenizer import CLIPTokenizer


@functools.cache
def tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    return CLIPTokenizer.bundled(pad_token=pad_token)


@functools.cache
def encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(TINY.text).eval()


def assert_runs(prompt: str, expected: list[tuple[str, float]]) -> None:
    got = parse_weights(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected], got
    assert [w for _, w in got] == pytest.approx([w for _, w in expected]), got


WORDS = "cat dog red blue tree house sky sun moon star river hill road car boat bird fish city".split()


def words(n: int, offset: int = 0) -> str:
    """n words, each one CLIP token."""
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


# --- parse_weights ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, expected", [
    # the examples in the docstring of A1111's parse_prompt_attention
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
    # the cases named in A1111's wiki
    ("a (red:1.5) cat", [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]),
    ("((a))", [("a", 1.21)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.21)]),
    ("([a])", [("a", 1.0)]),
    ("(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("((a:2):3)", [("a", 6.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:.5)", [("a", 0.5)]),
    # escapes
    (r"\(a\) \[b\]", [("(a) [b]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"a\b", [("ab", 1.0)]),  # a lone backslash is dropped
    (r"(a\)", [("a)", 1.1)]),
    # unbalanced and stray syntax
    ("a) b]", [("a) b]", 1.0)]),
    ("[a", [("a", 1 / 1.1)]),
    ("(a [b", [("a ", 1.1), ("b", 1.0)]),
    ("a:1.5) b", [("a:1.5) b", 1.0)]),  # a weight with no open bracket is text
    ("(a:1.5", [("a:1.5", 1.1)]),
    ("[a:1.5]", [("a:1.5", 1 / 1.1)]),
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # A1111 raises here; the number is text and "(" stays open
    ("(a)(b:1.1)c", [("ab", 1.1), ("c", 1.0)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", BREAK_WEIGHT), ("b", 1.0)]),
    ("a BREAKfast, break", [("a BREAKfast, break", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", BREAK_WEIGHT), ("", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", BREAK_WEIGHT), ("b", 1.1)]),
])
def test_parse_weights(prompt, expected):
    assert_runs(prompt, expected)


def test_break_markers_are_never_merged():
    texts = [text for text, _ in parse_weights("BREAK BREAK")]
    assert texts == ["", "BREAK", "", "BREAK", ""]


SYNTAX_HEAVY = st.text(alphabet=st.sampled_from(list("()[]:\\ .,+-0123456789abBREAK")), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), SYNTAX_HEAVY))
def test_parse_weights_never_raises(prompt):
    runs = parse_weights(prompt)
    assert runs and all(isinstance(text, str) and isinstance(w, float) for text, w in runs)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60).filter(lambda s: not set(s) & set("()[]\\") and "BREAK" not in s))
def test_bracket_free_text_is_one_plain_run(prompt):
    assert parse_weights(prompt) == [(prompt, 1.0)]


def escape(text: str) -> str:
    return "".join("\\" + c if c in "()[]\\" else c for c in text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60).filter(lambda s: "BREAK" not in s), st.sampled_from([0.5, 1.3, 2.0]))
def test_escaped_text_round_trips(text, weight):
    assert parse_weights(escape(text)) == [(text, 1.0)]
    if text:
        assert parse_weights(f"({escape(text)}:{weight})") == [(text, weight)]


# --- tokenize_weighted -----------------------------------------------------------------------------

def inner(chunk, tok) -> list[int]:
    """The prompt tokens of a chunk, checking its bos ... eos pad ... frame."""
    assert len(chunk.ids) == len(chunk.weights) == tok.max_length
    assert chunk.ids[0] == tok.bos_id
    end = chunk.ids.index(tok.eos_id)
    assert chunk.ids[end + 1:] == [tok.pad_id] * (tok.max_length - end - 1)
    assert chunk.weights[0] == 1.0 and set(chunk.weights[end:]) == {1.0}
    return chunk.ids[1:end]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_long_prompt_splits_into_75_token_chunks(pad):
    tok = tokenizer(pad)
    prompt = words(200)
    ids = tok.encode(prompt)
    assert len(ids) == 200
    chunks = tokenize_weighted(tok, prompt)
    assert len(chunks) == 3
    assert [inner(c, tok) for c in chunks] == [ids[:75], ids[75:150], ids[150:]]
    assert chunks[0].ids[-1] == tok.eos_id and chunks[2].ids[51] == tok.eos_id
    assert chunks[2].ids[52:] == [tok.pad_id] * 25


def test_chunk_boundaries():
    tok = tokenizer()
    assert len(tokenize_weighted(tok, words(75))) == 1
    assert len(tokenize_weighted(tok, words(76))) == 2
    (empty,) = tokenize_weighted(tok, "")
    assert empty.ids == tok([""])[0].tolist()


def test_short_plain_chunk_is_the_tokenizers_row():
    tok = tokenizer("!")
    (chunk,) = tokenize_weighted(tok, "a photo of a cat")
    assert chunk.ids == tok(["a photo of a cat"])[0].tolist()
    assert chunk.weights == [1.0] * 77


def test_weights_follow_their_tokens():
    tok = tokenizer()
    (chunk,) = tokenize_weighted(tok, "a (red:1.5) [cat]")
    assert chunk.ids[:5] == [tok.bos_id, *tok.encode("a red cat"), tok.eos_id]
    assert chunk.weights[:5] == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])


def test_comma_backtrack_moves_the_last_clause():
    tok = tokenizer()
    prompt = words(70) + ", " + words(10, offset=3)
    ids = tok.encode(prompt)
    assert len(ids) == 81 and ids[70] == tok.vocab[",</w>"]
    first, second = tokenize_weighted(tok, prompt)
    assert inner(first, tok) == ids[:71] and inner(second, tok) == ids[71:]
    # turned off, or with the comma too far from the end: plain 75-token splits
    for chunks in (tokenize_weighted(tok, prompt, comma_backtrack=0),
                   tokenize_weighted(tok, words(40) + ", " + words(40))):
        assert [len(inner(c, tok)) for c in chunks] == [75, 6]


def test_break_starts_a_new_chunk():
    tok = tokenizer("!")
    chunks = tokenize_weighted(tok, "a cat BREAK (a dog)")
    assert [inner(c, tok) for c in chunks] == [tok.encode("a cat"), tok.encode("a dog")]
    assert chunks[1].weights[1:3] == pytest.approx([1.1, 1.1])
    assert len(tokenize_weighted(tok, "a cat BREAK")) == 1
    nested = tokenize_weighted(tok, "((a cat BREAK a dog))")  # a BREAK inside brackets still splits
    assert [inner(c, tok) for c in nested] == [tok.encode("a cat"), tok.encode("a dog")]
    lead = tokenize_weighted(tok, "BREAK a cat")  # an empty first chunk, as in A1111
    assert [inner(c, tok) for c in lead] == [[], tok.encode("a cat")]
    full = tokenize_weighted(tok, words(75) + " BREAK dog")
    assert [len(inner(c, tok)) for c in full] == [75, 1]


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=80), SYNTAX_HEAVY))
def test_chunks_are_always_framed(prompt):
    tok = tokenizer("!")
    chunks = tokenize_weighted(tok, prompt)
    assert chunks
    for chunk in chunks:
        assert len(inner(chunk, tok)) <= 75


# --- encode_prompt -----------------------------------------------------------------------------------

@pytest.mark.parametrize("clip_skip", [1, 2])
def test_plain_prompt_is_bit_identical_to_the_text_encoder(clip_skip):
    tok, te = tokenizer(), encoder()
    with torch.no_grad():
        for prompts in (["a photo of a cat, 4k: trending"], ["a cat", "", words(75)]):
            ours = encode_prompt(te, tok, prompts if len(prompts) > 1 else prompts[0], clip_skip=clip_skip)
            reference = te(tok(prompts), clip_skip=clip_skip)
            assert torch.equal(ours, reference)


def test_long_prompt_concatenates_chunk_encodings():
    tok, te = tokenizer("!"), encoder()
    prompt = words(100)
    with torch.no_grad():
        z = encode_prompt(te, tok, prompt)
        assert z.shape == (1, 154, 32)
        ids = torch.tensor([c.ids for c in tokenize_weighted(tok, prompt)])
        assert torch.equal(z[0, :77], te(ids[:1])[0]) and torch.equal(z[0, 77:], te(ids[1:])[0])


def test_batch_pads_with_empty_chunks():
    tok, te = tokenizer("!"), encoder()
    with torch.no_grad():
        z = encode_prompt(te, tok, ["a cat", words(100)])
        assert z.shape == (2, 154, 32)
        empty = te(tok([""]))[0]
        assert torch.equal(z[0, :77], te(tok(["a cat"]))[0])
        assert torch.equal(z[0, 77:], empty)
        z3 = encode_prompt(te, tok, ["a cat", words(100)], num_chunks=3)
        assert z3.shape == (2, 231, 32) and torch.equal(z3[1, 154:], empty) and torch.equal(z3[:, :154], z)
        with pytest.raises(ValueError, match="num_chunks"):
            encode_prompt(te, tok, words(100), num_chunks=1)


def test_encode_pair_matches_chunk_counts():
    tok, te = tokenizer(), encoder()
    with torch.no_grad():
        cond, uncond = encode_pair(te, tok, ["a cat", "a dog"], words(90) + " BREAK x")
        assert cond.shape == uncond.shape == (2, 231, 32)
        assert torch.equal(cond, encode_prompt(te, tok, ["a cat", "a dog"], num_chunks=3))
        assert torch.equal(uncond[0], uncond[1])
        cond, uncond = encode_pair(te, tok, "a cat")
        assert torch.equal(uncond, te(tok([""]))) and torch.equal(cond, te(tok(["a cat"])))
        with pytest.raises(ValueError, match="negative"):
            encode_pair(te, tok, ["a", "b", "c"], ["x", "y"])


@functools.cache
def biased_encoder() -> CLIPTextModel:
    """A tiny encoder whose final LayerNorm has a bias, as every trained CLIP does: its states have a
    mean well away from 0, so A1111's mean restoration is well-defined (see `apply_weights`)."""
    te = CLIPTextModel(TINY.text).eval()
    with torch.no_grad():
        te.final_layer_norm.bias.copy_(torch.linspace(-0.5, 1.0, TINY.text.width))
    return te


def test_weights_scale_only_their_tokens_and_keep_the_mean():
    tok, te = tokenizer(), biased_encoder()
    with torch.no_grad():
        z = te(tok(["a red cat"]))[0]
        out = encode_prompt(te, tok, "a (red:1.5) cat")[0]
    assert out.mean().item() == pytest.approx(z.mean().item(), rel=1e-5, abs=1e-7)
    w = torch.ones(77)
    w[2] = 1.5
    c = z.mean() / (z * w[:, None]).mean()
    assert not torch.allclose(c, torch.ones(()))
    unrestored = out / c  # the result before the mean restoration
    assert torch.allclose(unrestored[2], 1.5 * z[2], rtol=1e-5, atol=1e-6)
    others = torch.arange(77) != 2
    assert torch.allclose(unrestored[others], z[others], rtol=1e-5, atol=1e-6)


def test_apply_weights_is_per_row():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 77, 8, generator=g) + 0.5
    weights = torch.ones(3, 77)
    weights[1, 5:9] = 0.5
    out = apply_weights(hidden, weights)
    assert torch.equal(out[0], hidden[0]) and torch.equal(out[2], hidden[2])
    assert out[1].mean().item() == pytest.approx(hidden[1].mean().item(), rel=1e-5)
    ratio = out[1] / hidden[1]
    assert torch.allclose(ratio[5:9], ratio[0, 0] * 0.5) and torch.allclose(ratio[9:], ratio[0, 0])


def test_mean_restoration_where_the_mean_is_zero():
    """A freshly initialised encoder (final LayerNorm bias 0) gives each token a mean of 0 up to rounding,
    so A1111's mean(z) / mean(z * w) is noise over noise (inf or NaN on some machines). Such rows keep the
    weighted states unrestored; the result is finite and exactly z * w."""
    g = torch.Generator().manual_seed(0)
    half = torch.randn(2, 77, 4, generator=g)
    exact_zero = torch.cat([half, -half], dim=2)  # every token's mean is exactly 0: old code gave 0/0
    normed = torch.nn.functional.layer_norm(torch.randn(2, 77, 8, generator=g) * 3 + 1, (8,))
    weights = torch.ones(2, 77)
    weights[:, 3:6] = 1.4
    for hidden in (exact_zero, normed):
        out = apply_weights(hidden, weights)
        assert torch.isfinite(out).all()
        assert torch.equal(out, hidden * weights[..., None])

    tok, te = tokenizer(), encoder()  # fresh: zero LayerNorm bias
    with torch.no_grad():
        z = te(tok(["a red cat"]))[0]
        out = encode_prompt(te, tok, "a (red:1.5) cat")[0]
    w = torch.ones(77)
    w[2] = 1.5
    assert torch.isfinite(out).all()
    assert torch.equal(out, z * w[:, None])


def test_mean_restoration_keeps_a1111s_result_where_defined():
    """Bit for bit A1111's formula, in float32 as A1111 computes it, for states with a clear mean."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 77, 16, generator=g) + torch.tensor([0.3, -0.2])[:, None, None]
    weights = torch.ones(2, 77)
    weights[0, 4:7] = 1.3
    weights[1, 10:12] = 0.7
    z = hidden * weights[..., None]
    expected = z * (hidden.mean((1, 2), keepdim=True) / z.mean((1, 2), keepdim=True))
    assert torch.equal(apply_weights(hidden, weights), expected)

"""CLIP's byte-level BPE tokenizer, written to give the same ids as `transformers.CLIPTokenizer`.

The text encoder of Stable Diffusion is CLIP's (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"); its tokenizer is byte-pair encoding (Sennrich et al.
2016, "Neural Machine Translation of Rare Words with Subword Units") over the UTF-8 bytes of
lower-cased text, with `</w>` marking the last piece of each word.

The pipeline follows the one transformers builds on the `tokenizers` library, step by step:
1. literal special tokens (bos, eos, pad) are cut out of the raw text and kept as single ids (so
   with SD2's pad token "!" a literal "!!" gives two ids 0, not the merged "!!", as transformers does);
2. each remaining part is normalized: NFC, runs of whitespace -> " ", lower-cased one char at a time
   (so a final "Σ" becomes "σ", never "ς");
3. it is split by CLIP's pattern, then each piece again by GPT-2's byte-level pattern (this only
   matters for a special token reached through lower-casing, e.g. "<|ENDOFTEXT|>");
4. each word's UTF-8 bytes are mapped to printable chars and merged by BPE.

Known skew: the reference's Unicode tables come from several versions (NFC: 9.0; regex classes and
lower-casing: 16.0), ours from Python's `unicodedata` (14.0 on Python 3.11) and the `regex` package.
Ids can differ only around code points whose data changed between those versions: ~100 combining
marks added in Unicode 10-14, and letters/digits/case pairs added since 14 (tests/test_tokenizer.py
computes the exact set). No ordinary prompt contains them.
"""

from __future__ import annotations

import gzip
import json
import unicodedata
from importlib import resources
from pathlib import Path

import regex
import torch

from .errors import CheckpointError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The files a tokenizer folder may hold (ours and transformers'): a folder of these alone is replaced by `save`.
TOKENIZER_FILES = {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json",
                   "added_tokens.json"}
_WHITESPACE = regex.compile(r"\s+")
_CLIP_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
)
# GPT-2's pattern less its space handling: CLIP's pieces contain no whitespace.
_BYTE_LEVEL_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+""")


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable char: printable Latin-1 bytes to themselves, the rest to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    return dict(zip(printable + others, chars))  # this order is also the order of the first 256 ids


_BYTE_CHARS = bytes_to_unicode()


def normalize(text: str) -> str:
    """NFC, collapse whitespace runs to one space, lower-case char by char."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(map(str.lower, text))


def _read_json(path: Path):
    """A JSON file's value; anything unreadable as UTF-8 JSON raises CheckpointError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _json_object(path: Path) -> dict:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, not {type(data).__name__}")
    return data


def _json_token(folder: Path, key: str) -> str | None:
    """Read a token from special_tokens_map.json or tokenizer_config.json (a string or {"content": ...})."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            value = _json_object(path).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


def _merge_pairs(lines, where: str) -> list[tuple[str, str]]:
    """Merges from "a b" strings or [a, b] pairs; anything else is an error naming `where` and the entry."""
    merges = []
    for n, m in enumerate(lines, 1):
        pair = tuple(m.split()) if isinstance(m, str) else tuple(m) if isinstance(m, list) else ()
        if len(pair) != 2 or not all(isinstance(x, str) and x for x in pair):
            raise CheckpointError(f"{where}: merge {n} is not a pair of tokens: {str(m)[:80]!r}")
        merges.append(pair)
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from an HF `tokenizers` file (merges as "a b" strings or [a, b] pairs)."""
    model = _json_object(path).get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict) \
            or not isinstance(model.get("merges"), list):
        raise CheckpointError(f"{path}: not a BPE tokenizer file (no model.vocab object and model.merges list)")
    return model["vocab"], _merge_pairs(model["merges"], str(path))


def _words(text: str):
    """The pre-tokenized words of `text` (no special tokens): normalised, split by CLIP's pattern, then
    by GPT-2's byte-level one."""
    for piece in _CLIP_SPLIT.findall(normalize(text)):
        yield from _BYTE_LEVEL_SPLIT.findall(piece)


def _symbols(word: str) -> list[str]:
    """A word's UTF-8 bytes as printable chars, `</w>` on the last: what BPE merges start from."""
    parts = [_BYTE_CHARS[b] for b in word.encode("utf-8")]
    parts[-1] += "</w>"
    return parts


def _merge(parts: list[str], pair: tuple[str, str]) -> list[str]:
    """`parts` with every occurrence of `pair` joined, left to right."""
    merged, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            merged.append(parts[i] + parts[i + 1])
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id layout: every byte, every byte ending a word, the merges' results in rank order, bos, eos."""
    alphabet = list(_BYTE_CHARS.values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def _check_vocabulary(vocab, merges, pad_token, max_length) -> None:
    """CheckpointError unless every token BPE can produce has an id: a dict of token -> id (a non-negative
    integer) holding bos, eos, the pad token, every byte alone and ending a word, and every merge's result."""
    if not isinstance(vocab, dict):
        raise CheckpointError(f"the vocabulary must be an object of token -> id, not {type(vocab).__name__}")
    for token, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise CheckpointError(f"the vocabulary gives the token {token[:40]!r} the id {str(i)[:40]!r}, "
                                  "not a non-negative integer")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 3:
        raise CheckpointError(f"max length {str(max_length)[:40]!r} is not an integer of at least 3 "
                              "(bos, a token, eos)")
    if not isinstance(pad_token, str):
        raise CheckpointError(f"the pad token {str(pad_token)[:40]!r} is not a string")
    needed = [BOS, EOS, pad_token, *_BYTE_CHARS.values(), *(c + "</w>" for c in _BYTE_CHARS.values())]
    for token in needed + ["".join(pair) for pair in merges]:
        if token not in vocab:
            raise CheckpointError(f"the vocabulary lacks the token {token!r}")


class CLIPTokenizer:
    """Text -> CLIP token ids, padded to a fixed length; ids match `transformers.CLIPTokenizer`."""

    def __init__(
        self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS, max_length: int = 77
    ):
        _check_vocabulary(vocab, merges, pad_token, max_length)
        self.vocab = dict(vocab)
        self.merges = [tuple(pair) for pair in merges]
        self.pad_token = pad_token
        self._max_length = int(max_length)
        self._decoder = {i: token for token, i in self.vocab.items()}
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._byte_values = {c: b for b, c in _BYTE_CHARS.items()}
        specials = sorted({BOS, EOS, pad_token}, key=len, reverse=True)
        self._special_split = regex.compile("(" + "|".join(map(regex.escape, specials)) + ")")
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def bundled(cls, pad_token: str = EOS) -> CLIPTokenizer:
        """OpenAI's CLIP vocabulary shipped in the package (SD1 pads with eos, SD2 with "!")."""
        data = resources.files("sdtorch") / "data" / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.decompress(data.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        return cls(_clip_vocab(merges), merges, pad_token=pad_token)

    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 1024) -> CLIPTokenizer:
        """A CLIP-style BPE learnt from `texts` (Sennrich et al. 2016, "Neural Machine Translation of Rare
        Words with Subword Units", Algorithm 1): the same normalisation, splitting and byte alphabet as
        CLIP, so this class encodes with it unchanged. Each step merges the most frequent adjacent pair,
        ties going to the pair that sorts first, so the same texts always give the same tokenizer (HF's
        trainer broke ties and numbered tokens in hash-map order, new in every process, and a token's id
        picks its embedding row). Ids follow CLIP's layout: every byte, every byte ending a word, the
        merges in rank order, bos, eos. `vocab_size` counts all of them and caps the merges; merging
        also stops when no pair occurs twice."""
        from collections import Counter, defaultdict

        if vocab_size < 2 * 256 + 2:
            raise ValueError(f"vocab_size {vocab_size} is below 514: every byte, alone and ending a word, and bos/eos")
        counts = Counter(word for text in texts for word in _words(text))
        words = [_symbols(w) for w in counts]
        freq = list(counts.values())
        pairs: Counter[tuple[str, str]] = Counter()
        where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)  # pair -> words holding it
        for k, w in enumerate(words):
            for pair in zip(w, w[1:]):
                pairs[pair] += freq[k]
                where[pair].add(k)
        merges: list[tuple[str, str]] = []
        made: set[str] = set()  # the merges' distinct results: each is one more token
        while 2 * 256 + len(made) + 2 < vocab_size and pairs:
            count, best = min((-n, pair) for pair, n in pairs.items())  # most frequent, then first in order
            if -count < 2:
                break
            merges.append(best)
            made.add("".join(best))
            for k in sorted(where.pop(best)):
                w, n = words[k], freq[k]
                for pair in zip(w, w[1:]):  # take the word's pairs out, merge, put the new ones in
                    pairs[pair] -= n
                    if pairs[pair] <= 0:
                        del pairs[pair]
                words[k] = _merge(w, best)
                for pair in zip(words[k], words[k][1:]):
                    pairs[pair] += n
                    where[pair].add(k)
        return cls(_clip_vocab(merges), merges)

    @classmethod
    def _made(cls, where: str, vocab, merges, pad_token: str, max_length) -> CLIPTokenizer:
        try:
            return cls(vocab, merges, pad_token=pad_token, max_length=max_length)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Load a diffusers/transformers tokenizer folder: vocab.json, merges.txt, special tokens json."""
        folder = Path(path)
        if not (folder / "vocab.json").is_file() and (folder / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")  # transformers >= 5 writes only this
        else:
            for name in ("vocab.json", "merges.txt"):
                if not (folder / name).is_file():
                    raise CheckpointError(f"{folder / name}: tokenizer file not found")
            vocab = _json_object(folder / "vocab.json")
            try:
                lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{folder / 'merges.txt'}: not UTF-8 text "
                                      f"({e.reason} at byte {e.start})") from None
            lines = [line.strip() for line in lines if line.strip() and not line.startswith("#version")]
            merges = _merge_pairs(lines, str(folder / "merges.txt"))
        max_length = 77
        config = folder / "tokenizer_config.json"
        if config.is_file():
            value = _json_object(config).get("model_max_length", 77)
            # transformers writes a huge number (1e30) when a tokenizer sets no limit: CLIP's 77 then
            max_length = 77 if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 100_000 \
                else value
            if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 3:
                raise CheckpointError(f"{config}: model_max_length = {repr(value)[:40]}: expected an integer of at "
                                      "least 3 (bos, a token, eos)")
        return cls._made(str(folder), vocab, merges, _json_token(folder, "pad_token") or EOS, max_length)

    METADATA_KEY = "sdtorch_tokenizer"  # safetensors metadata entry that carries a tokenizer (`to_metadata`)

    def to_metadata(self) -> dict[str, str]:
        """A safetensors metadata entry holding this tokenizer, or {} for the bundled CLIP one (which every
        reader falls back to): vocabulary, merges, pad token and row length as one JSON string."""
        bundled = CLIPTokenizer.bundled(self.pad_token)
        if (self.vocab, self.merges, self.max_length) == (bundled.vocab, bundled.merges, bundled.max_length):
            return {}
        data = {"vocab": self.vocab, "merges": [f"{a} {b}" for a, b in self.merges], "pad_token": self.pad_token,
                "max_length": self.max_length}
        return {self.METADATA_KEY: json.dumps(data, ensure_ascii=False)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], where: str) -> CLIPTokenizer | None:
        """The tokenizer `to_metadata` stored in a file's metadata, or None if there is none."""
        raw = metadata.get(cls.METADATA_KEY)
        if raw is None:
            return None
        where = f"{where}: {cls.METADATA_KEY} metadata"
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise CheckpointError(f"{where} is not JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("merges"), list):
            raise CheckpointError(f"{where}: expected an object with vocab, merges, pad_token and max_length")
        return cls._made(where, data.get("vocab"), _merge_pairs(data["merges"], where), data.get("pad_token", EOS),
                         data.get("max_length", 77))

    def save(self, folder: str | Path) -> None:
        """Write the folder layout that `transformers.CLIPTokenizer.from_pretrained` reads, built under a
        temporary name and renamed into place. An existing `folder` is replaced as a whole only when it is
        empty or holds tokenizer files alone (`TOKENIZER_FILES`); anything else there is refused."""
        from .fileio import atomic_folder, check_folder_destination

        folder = check_folder_destination(folder, what="a tokenizer folder (only tokenizer files)",
                                          replaceable=lambda f: all(p.name in TOKENIZER_FILES for p in f.iterdir()))
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **special}
        with atomic_folder(folder) as tmp:
            (tmp / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
            merges = "".join(f"{a} {b}\n" for a, b in self.merges)
            (tmp / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
            (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    @property
    def bos_id(self) -> int:
        """Id of `<|startoftext|>`."""
        return self.vocab[BOS]

    @property
    def eos_id(self) -> int:
        """Id of `<|endoftext|>`."""
        return self.vocab[EOS]

    @property
    def pad_id(self) -> int:
        """Id that fills a row after eos."""
        return self.vocab[self.pad_token]

    @property
    def max_length(self) -> int:
        """Row length of `__call__`, bos and eos included."""
        return self._max_length

    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary."""
        return len(self.vocab)

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenized word: its bytes as chars, `</w>` on the last, merged by rank."""
        if word in self._cache:
            return self._cache[word]
        parts = _symbols(word)
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda pair: self._ranks.get(pair, float("inf")))
            if best not in self._ranks:
                break
            parts = _merge(parts, best)
        ids = [self.vocab[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos and without truncation."""
        ids: list[int] = []
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:  # odd parts are the captured special tokens
                ids.append(self.vocab[part])
                continue
            for word in _words(part):
                ids.extend(self._bpe(word))
        return ids

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """LongTensor [B, max_length]: bos, the first max_length-2 ids, eos, then pad."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            row = [self.bos_id, *self.encode(text)[: self.max_length - 2], self.eos_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def decode(self, ids) -> str:
        """Best-effort text of `ids`: skips bos, stops at the first eos, `</w>` becomes a space."""
        data = bytearray()
        for i in map(int, ids):
            if i == self.eos_id:
                break
            token = "" if i == self.bos_id else self._decoder.get(i, "")
            word_end = token.endswith("</w>")
            data += bytes(self._byte_values[c] for c in token.removesuffix("</w>") if c in self._byte_values)
            data += b" " if word_end else b""
        return data.decode("utf-8", errors="replace").strip()

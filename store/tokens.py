"""Token ids shown as text, the way Neuronpedia and SAEDashboard show them.

One rule for every place latentstore shows tokens (the queries' ``token`` and ``context``
columns, ``latentstore top``, the dashboards and the Neuronpedia export):

- a byte-level BPE token (GPT-2, Llama 3, Qwen, ...) is shown as the text of its bytes: ``Ġ``
  becomes a space, ``Ċ`` a newline, ``ĉ`` a tab, ``âĢĻ`` a ``’``;
- a SentencePiece token (Llama 2, Gemma, ...) has ``▁`` shown as a space, and a byte-fallback
  token ``<0x0A>`` as the byte's text;
- a token of any other tokenizer (word-level, WordPiece) is shown decoded alone;
- bytes that are not UTF-8 text on their own (a piece of a longer character) are shown as escapes
  such as ``\\xe2``, one per byte, so that two such tokens never look alike; never as "�";
- special tokens (BOS, EOS, padding, unknown, and the tokenizer's added special tokens) are
  shown as their names in angle or square brackets, e.g. ``<|endoftext|>``, ``<bos>``, ``[UNK]``:
  a name without brackets is put in ``<>``;
- an id past the tokenizer's vocabulary (a model's ``d_vocab`` may be larger) is shown as
  ``<|outofrange|>``, as SAEDashboard shows it.

The display needs the tokenizer's own token strings (``convert_ids_to_tokens``): decoding an id
alone loses the bytes of a partial character. ``TokenDisplay.from_tokenizer`` takes them from a
loaded tokenizer (``pipeline.tokens.token_display`` loads the run's); a store's decoded
vocabulary alone gives ``TokenDisplay.from_decoded``, which marks each undecodable token with its
id instead. Nothing here imports ``transformers``: a tokenizer is used through its methods.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np

TokenizerKind = Literal["byte_level", "sentencepiece", "plain"]
OUT_OF_RANGE = "<|outofrange|>"
SENTENCEPIECE_SPACE = "\u2581"  # ▁


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): the character standing for each byte, mapped to the
    byte. Printable Latin-1 bytes stand for themselves; the others (controls, space, 0x7F-0xA0,
    0xAD) stand for 256, 257, ... in byte order, which is how space became ``Ġ`` (256 + 32)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in alphabet.values())
    alphabet.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return alphabet


def show_bytes(data: bytes) -> str:
    """Bytes as text: UTF-8 where it decodes, each other byte as a ``\\xNN`` escape."""
    return data.decode("utf-8", errors="backslashreplace")


def byte_level_bytes(raw: str) -> bytes | None:
    """A byte-level BPE token string's bytes, or None when it is not made of the alphabet
    (an added token, e.g. ``<|endoftext|>`` of a tokenizer whose specials are not marked special)."""
    alphabet = byte_level_alphabet()
    try:
        return bytes(alphabet[c] for c in raw)
    except KeyError:
        return None


def sentencepiece_bytes(raw: str) -> bytes:
    """A SentencePiece token string's bytes: ``▁`` is a space, ``<0xNN>`` one byte."""
    if len(raw) == 6 and raw.startswith("<0x") and raw.endswith(">"):
        try:
            return bytes([int(raw[3:5], 16)])
        except ValueError:
            pass
    return raw.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")


def show_special(name: str) -> str:
    """A special token's name, marked: kept when already in ``<>`` or ``[]``, else put in ``<>``."""
    if len(name) >= 2 and (name[0], name[-1]) in (("<", ">"), ("[", "]")):
        return name
    return f"<{name}>"


def show_token(raw: str, kind: TokenizerKind) -> str:
    """One token string of a tokenizer of ``kind`` as it is shown (see the module's rules)."""
    if kind == "byte_level":
        data = byte_level_bytes(raw)
        return raw if data is None else show_bytes(data)
    if kind == "sentencepiece":
        return show_bytes(sentencepiece_bytes(raw))
    return raw


@dataclass(frozen=True)
class TokenDisplay:
    """The shown text of every token id, computed once; ``text(ids)`` looks ids up."""

    strings: tuple[str, ...]
    kind: TokenizerKind | Literal["decoded", "ids"]  # "ids": no vocabulary at all, ids shown as numbers
    _lookup: np.ndarray = field(init=False, repr=False, compare=False)  # the strings, then OUT_OF_RANGE; ids: numbers

    def __post_init__(self) -> None:
        lookup = np.empty(len(self.strings) + 1, dtype=object)
        lookup[:-1], lookup[-1] = self.strings, OUT_OF_RANGE
        object.__setattr__(self, "_lookup", lookup[:0] if self.kind == "ids" else lookup)

    def text(self, ids: Iterable[int] | np.ndarray) -> list[str]:
        """The shown text of each id (``<|outofrange|>`` past the vocabulary)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.kind == "ids":  # numbers, from a table of them grown to the largest id asked for
            if len(ids) and (ids.min() < 0 or ids.max() >= 1 << 20):  # past any vocabulary: not tabled
                return [str(i) for i in ids.tolist()]
            table = self._lookup  # read once: another thread may replace it meanwhile
            if len(ids) and ids.max() >= len(table):
                table = np.array([str(i) for i in range(1 << int(ids.max()).bit_length())], object)
                object.__setattr__(self, "_lookup", table)
            return table[ids].tolist()
        n = len(self.strings)
        return self._lookup[np.where((ids >= 0) & (ids < n), ids, n)].tolist()

    def __len__(self) -> int:
        return len(self.strings)

    @classmethod
    def from_tokens(cls, tokens: Sequence[str | None], kind: TokenizerKind,
                    special: dict[int, str] | None = None, d_vocab: int | None = None) -> TokenDisplay:
        """From the tokenizer's token strings (``convert_ids_to_tokens``; None for an id it lacks),
        its kind and its special tokens (id -> name). ``d_vocab`` pads to the model's vocabulary."""
        special = special or {}
        strings = [show_special(special[i]) if i in special else OUT_OF_RANGE if raw is None else show_token(raw, kind)
                   for i, raw in enumerate(tokens)]
        strings += [OUT_OF_RANGE] * max(0, (d_vocab or 0) - len(strings))
        return cls(tuple(strings), kind)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, d_vocab: int | None = None) -> TokenDisplay:
        """From a loaded Hugging Face tokenizer (fast or slow). A ``plain`` tokenizer's tokens are
        each decoded alone, as the store's vocabulary holds them (``##ing`` of a WordPiece is ``ing``)."""
        n, kind = len(tokenizer), tokenizer_kind(tokenizer)
        if kind == "plain":
            tokens = tokenizer.batch_decode([[i] for i in range(n)])
        else:
            tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
        special = {int(i): str(tokenizer.convert_ids_to_tokens(int(i))) for i in tokenizer.all_special_ids
                   if 0 <= int(i) < n}
        return cls.from_tokens(tokens, kind, special, d_vocab)

    @classmethod
    def from_decoded(cls, vocab: Sequence[str] | None, special_ids: Iterable[int] = ()) -> TokenDisplay:
        """From each id decoded alone (the store's vocabulary), when the tokenizer is not at hand:
        special ids marked, and a token that lost bytes in decoding shown as ``<token ID>`` (its
        bytes cannot be told from the decoded text). Without a vocabulary, ids are shown as numbers."""
        special = set(special_ids)
        if vocab is None:
            return cls((), "ids")
        strings = [show_special(s) if i in special else f"<token {i}>" if "\ufffd" in s else s
                   for i, s in enumerate(vocab)]
        return cls(tuple(strings), "decoded")


def tokenizer_kind(tokenizer: Any) -> TokenizerKind:
    """``byte_level`` when the tokenizer's decoder (or pre-tokenizer) is ByteLevel, ``sentencepiece``
    when it decodes ``▁`` or byte-fallback tokens, else ``plain``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        parts = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")], ensure_ascii=False)
        if '"ByteLevel"' in parts:
            return "byte_level"
        if '"Metaspace"' in parts or '"ByteFallback"' in parts or SENTENCEPIECE_SPACE in parts:
            return "sentencepiece"
        return "plain"
    if hasattr(tokenizer, "byte_encoder"):  # a slow GPT-2 style tokenizer
        return "byte_level"
    if hasattr(tokenizer, "sp_model"):
        return "sentencepiece"
    return "plain"

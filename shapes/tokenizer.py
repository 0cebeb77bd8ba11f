"""CLIP-format BPE tokenizers built offline: the byte-level one and the shapes-grammar one.

Both are genuine ``transformers.CLIPTokenizer`` objects (the format Stable Diffusion
pipelines load). Their vocabulary holds every byte symbol of the GPT-2 / CLIP byte table, plain
and word-final (``</w>``), so any text tokenizes without an unknown token:

- :func:`byte_level_tokenizer`: no merges, one token per character (tiny test pipelines);
- :func:`build_shapes_tokenizer`: merges learned from the words of the shapes grammar
  (:func:`grammar_words`, :func:`learn_merges`), so that every grammar word is one token
  (the tokenizer of the shapes-world Stable Diffusion in ``shapes/assets/sd``).

transformers 5 ignores ``vocab_file=`` keyword arguments, so :func:`clip_tokenizer` writes
``vocab.json`` and ``merges.txt`` to a temporary folder and loads it with
``CLIPTokenizer.from_pretrained(folder)`` (works with transformers 4 and 5).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from shapes.prompts import NUMBER_WORDS
from shapes.world import COLORS, RELATIONS, SHAPES, SIZES

__all__ = [
    "build_shapes_tokenizer",
    "byte_level_tokenizer",
    "bytes_to_unicode",
    "clip_tokenizer",
    "grammar_words",
    "learn_merges",
]

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
"""CLIP's start and end tokens (the last two ids of the vocabulary)."""


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP byte -> printable unicode character table (a documented standard)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, [chr(c) for c in chars]))


def clip_tokenizer(merges: Sequence[tuple[str, str]], max_length: int):
    """A ``CLIPTokenizer`` with the byte symbols, the results of ``merges`` and CLIP's specials.

    Token ids: the 256 byte symbols, then their word-final (``</w>``) forms, then each merge
    result in merge order (the first occurrence keeps its id), then the two specials.
    """
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]:
        vocab.setdefault(s, len(vocab))
    for s in SPECIAL_TOKENS:
        vocab[s] = len(vocab)
    with tempfile.TemporaryDirectory(prefix="clip_bpe_tok_") as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def byte_level_tokenizer(max_length: int):
    """A ``CLIPTokenizer`` over single bytes (vocabulary 512 + 2 specials, no merges)."""
    return clip_tokenizer([], max_length)


def grammar_words() -> list[str]:
    """Every word of the shapes grammar (``shapes.prompts``), punctuation included."""
    words = {"a", "an", "and", ",", "."}
    words |= {w for n, w in NUMBER_WORDS.items() if n > 1}
    words |= set(COLORS) | set(SIZES) | set(SHAPES) | {s + "s" for s in SHAPES}
    words |= {w for rel in RELATIONS for w in rel.split()}
    return sorted(words)


def _apply_merge(seq: list[str], pair: tuple[str, str]) -> list[str]:
    """``seq`` with every non-overlapping occurrence of ``pair`` (left to right) joined."""
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` (each counted once) until every word is a single symbol.

    Symbols follow CLIP: the last character of a word carries ``</w>``. Ties between equally
    frequent pairs go to the lexicographically smallest pair, so the result is deterministic.
    """
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter((s[i], s[i + 1]) for s in seqs for i in range(len(s) - 1))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        seqs = [_apply_merge(s, best) for s in seqs]
    return merges


def build_shapes_tokenizer(max_length: int):
    """A ``CLIPTokenizer`` whose BPE makes each grammar word one token (built offline).

    Raises ``RuntimeError`` if a grammar word does not come out as a single token.
    """
    words = grammar_words()
    tok = clip_tokenizer(learn_merges(words), max_length)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits grammar word {w!r} into {ids}; BPE is broken")
    return tok

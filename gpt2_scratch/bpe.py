"""Byte-pair encoding, written to be read: the algorithm behind GPT-2's tokenizer in plain Python.

Training: split text into words, spell each word as bytes, then repeatedly count adjacent pairs of symbols and merge
the most frequent pair into a new symbol. Encoding: spell a word as bytes and apply the learned merges in the order
they were learned.

It learns exactly the merges of `gpt2_scratch.tokenizer.train_tokenizer` (the fast `tokenizers` trainer) and encodes
to the same ids — tests check both — but is far slower; use it to learn, not to train.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import regex

ENDOFTEXT = "<|endoftext|>"

# GPT-2's word splitter: contractions, letters, digits and punctuation runs (each with at most one leading space),
# and whitespace. Merges never cross these boundaries, so " dog" and " dog." share the token " dog".
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters.

    Why: merges are stored as text, so every byte needs a visible, non-whitespace stand-in. Printable bytes map to
    themselves; the rest (control characters, space, ...) are shifted to code points from 256 upwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_values, code_points = list(printable), list(printable)
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + len(code_points) - len(printable))
    return {byte: chr(code_point) for byte, code_point in zip(byte_values, code_points)}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}


def words_of(text: str) -> list[tuple[str, ...]]:
    """Split on the special token (never merged), then into GPT-2 words, each spelled as byte characters."""
    words = []
    for part in text.split(ENDOFTEXT):
        for word in GPT2_SPLIT.findall(part):
            words.append(tuple(BYTE_TO_CHAR[b] for b in word.encode("utf-8")))
    return words


def merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every occurrence of `pair` in `word`, left to right (in "aaa", (a, a) merges once: "aa a")."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


class ReferenceBPE:
    """A trained byte-level BPE: the merges in the order learned, and the vocabulary they imply."""

    def __init__(self, merges: list[tuple[str, str]]) -> None:
        self.merges = merges
        self.rank = {pair: i for i, pair in enumerate(merges)}  # earlier merges apply first
        # GPT-2's layout: the byte alphabet (by code point), each merge's new symbol, <|endoftext|> last.
        self.vocab: dict[str, int] = {}
        for symbol in [*sorted(BYTE_TO_CHAR.values()), *(a + b for a, b in merges), ENDOFTEXT]:
            self.vocab.setdefault(symbol, len(self.vocab))  # two merges can spell the same symbol: one id

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> ReferenceBPE:
        word_counts = Counter(word for text in texts for word in words_of(text))
        # The trainer numbers symbols as it meets them: the special token, the alphabet, then each new merge.
        # It breaks ties between equally frequent pairs by these numbers (smallest first), so we keep them too.
        order = {symbol: i for i, symbol in enumerate([ENDOFTEXT, *sorted(BYTE_TO_CHAR.values())])}
        merges: list[tuple[str, str]] = []
        while len(order) < vocab_size:
            pair_counts: Counter[tuple[str, str]] = Counter()
            for word, count in word_counts.items():
                for pair in zip(word, word[1:]):
                    pair_counts[pair] += count
            if not pair_counts:
                break  # every word is a single symbol: nothing left to merge
            best = max(pair_counts, key=lambda p: (pair_counts[p], -order[p[0]], -order[p[1]]))
            if pair_counts[best] < max(min_frequency, 1):
                break
            merges.append(best)
            order.setdefault(best[0] + best[1], len(order))
            merged_counts: Counter[tuple[str, ...]] = Counter()
            for word, count in word_counts.items():
                merged_counts[merge_pair(word, best)] += count
            word_counts = merged_counts
        return cls(merges)

    def encode_word(self, word: tuple[str, ...]) -> tuple[str, ...]:
        """Apply the earliest-learned merge present in the word, then the next, until none applies."""
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            first = min(pairs, key=lambda p: self.rank.get(p, len(self.rank)))
            if first not in self.rank:
                break
            word = merge_pair(word, first)
        return word

    def tokenize(self, text: str) -> list[str]:
        """Text → token strings; `<|endoftext|>` is kept whole."""
        tokens: list[str] = []
        for i, part in enumerate(text.split(ENDOFTEXT)):
            if i > 0:
                tokens.append(ENDOFTEXT)
            for word in words_of(part):
                tokens.extend(self.encode_word(word))
        return tokens

    def encode(self, text: str) -> list[int]:
        return [self.vocab[token] for token in self.tokenize(text)]

    def decode(self, ids: list[int]) -> str:
        symbols = {i: s for s, i in self.vocab.items()}
        text = "".join(symbols[i] for i in ids)
        parts = text.split(ENDOFTEXT)
        return ENDOFTEXT.join(bytes(CHAR_TO_BYTE[c] for c in part).decode("utf-8", errors="replace") for part in parts)

#!/usr/bin/env python3
"""An independent Python implementation of GPT-2's byte-level BPE encoder, used to produce the
expected token ids in tests/unit/test_tokenizer.cpp (the C++ tokenizer must agree with it).

It follows the published algorithm: text -> pre-tokens by GPT-2's regular expression (with the
third-party `regex` module, which knows \\p{L} and \\p{N}); each pre-token's UTF-8 bytes ->
printable characters by the bytes_to_unicode table; repeated merging of the adjacent pair of
lowest rank in vocab.bpe; lookup in encoder.json.

Usage: scripts/gpt2_bpe_reference.py [DIR]   (DIR holds encoder.json and vocab.bpe;
       default ../shared/data/gpt2-bpe relative to the repository)
Prints one C++ initializer line per test string: {"escaped text", {ids...}},
"""
import json
import os
import sys

import regex  # pip install regex: the standard `re` has no \p{L}

PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

# The test strings; keep in the same order as the C++ test's table.
TESTS = [
    "Hello",
    " world",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's what we'd've done; You'RE right, 'tis true.",
    "Numbers: 0, 42, 1234567, 3.14159 and -7e10.",
    "   three leading spaces and two  inside",
    "trailing spaces   ",
    "line one\nline two\n\n\tindented\r\n",
    "punctuation!!! ?!? ... (brackets) [x] {y} <z> @#$%^&*",
    "café naïve façade Ångström",
    "日本語のテキスト",
    "Привет, мир! Ελληνικά",
    "emoji 😀👍🏽 and ✨ sparkles",
    "mixed123abc 4you ²³ ½",
    "a\u00a0non-breaking space",
    "tabs\t\tand\u3000ideographic space",
    "<|endoftext|>",
    "URLs like https://example.com/path?q=1&r=2",
    "Ünïcödé ẞtraße — “quoted” ‘text’ …",
    " ",
    "\n\n\n",
    "x  \n  y",
]


def bytes_to_unicode():
    """Maps every byte to a printable character: the 188 printable Latin-1 bytes map to
    themselves; the others (controls, space, 0x7f-0xa0, 0xad) to U+0100 upward, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Gpt2Bpe:
    def __init__(self, directory):
        with open(os.path.join(directory, "encoder.json"), encoding="utf-8") as f:
            self.encoder = json.load(f)
        with open(os.path.join(directory, "vocab.bpe"), encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        self.rank = {pair: i for i, pair in enumerate(merges)}
        self.pair_of_rank = merges
        self.byte_char = bytes_to_unicode()

    def merge(self, symbols):
        while len(symbols) > 1:
            best = None
            for i in range(len(symbols) - 1):
                r = self.rank.get((symbols[i], symbols[i + 1]))
                if r is not None and (best is None or r < best):
                    best = r
            if best is None:
                break
            first, second = self.pair_of_rank[best]
            merged = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text):
        ids = []
        for piece in PATTERN.findall(text):
            symbols = [self.byte_char[b] for b in piece.encode("utf-8")]
            ids += [self.encoder[s] for s in self.merge(symbols)]
        return ids


def cpp_escape(s):
    """A C++ string literal body for the UTF-8 bytes of s: printable ASCII as is, the rest as
    \\xHH. A hex escape would swallow a following hex digit, so the literal is split there."""
    out = ""
    hex_before = False
    for b in s.encode("utf-8"):
        c = chr(b)
        if 0x20 <= b < 0x7F:
            if hex_before and c in "0123456789abcdefABCDEF":
                out += '" "'
            out += "\\" + c if c in '\\"' else c
            hex_before = False
        else:
            out += "\\x%02x" % b
            hex_before = True
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    directory = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "..", "shared", "data", "gpt2-bpe")
    bpe = Gpt2Bpe(directory)
    for text in TESTS:
        ids = bpe.encode(text)
        print('    {"%s", {%s}},' % (cpp_escape(text), ", ".join(str(i) for i in ids)))


if __name__ == "__main__":
    main()

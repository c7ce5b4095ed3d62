"""Byte-level tokenizer: every UTF-8 byte is a token, plus four specials.

No merges, no vocabulary file: any text round-trips, and the model's vocabulary only
needs ``VOCAB_SIZE`` (260, ``kubetrain.core.api.BYTE_VOCAB_MIN``) rows.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD = 256
BOS = 257
EOS = 258
SEP = 259
VOCAB_SIZE = 260
SPECIALS = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", SEP: "<sep>"}


def encode(text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Token ids of ``text`` (its UTF-8 bytes), optionally framed by BOS/EOS."""
    ids = list(text.encode("utf-8"))
    if bos:
        ids.insert(0, BOS)
    if eos:
        ids.append(EOS)
    return ids


def decode(ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
    """Text of ``ids``; specials are dropped, and decoding ends at EOS by default.

    Invalid UTF-8 (a model can emit any byte sequence) becomes U+FFFD instead of failing.
    """
    out = bytearray()
    for i in ids:
        i = int(i)
        if i == EOS and stop_at_eos:
            break
        if 0 <= i < 256:
            out.append(i)
    return out.decode("utf-8", errors="replace")

"""The byte-level tokenizer of the byte models: token i is the byte i (vocab 256)."""

from __future__ import annotations


class ByteTokenizer:
  """UTF-8 bytes as tokens. `decode` replaces invalid or incomplete byte sequences with U+FFFD."""

  vocab_size = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, tokens: list[int]) -> str:
    return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")

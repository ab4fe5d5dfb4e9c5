"""Text that comes from the terminal: arguments, standard input, typed lines.

Invalid UTF-8 is replaced, never an error: what does not decode becomes U+FFFD (the replacement character)
exactly as `bytes.decode("utf-8", errors="replace")` does, the prompt goes on, and nothing extra is printed.
Python hands such bytes over as lone surrogates (U+DC80..U+DCFF, "surrogateescape") in sys.argv and in
`input()`/`sys.stdin` under a non-UTF-8 locale; the tokenizer refuses those (not valid Unicode text), so
every piece of text typed by a person goes through `clean_text` first.
"""

from __future__ import annotations

import re
import sys

SURROGATES = re.compile("[\ud800-\udfff]")  # never valid alone in text
NOT_ESCAPED_BYTES = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # surrogates that surrogateescape never makes


def clean_text(text: str) -> str:
    """`text` with its lone surrogates replaced: the bytes they escape are decoded as UTF-8 with U+FFFD for what
    does not decode (as if the original bytes had been decoded with errors="replace"); any other lone surrogate
    becomes one U+FFFD."""
    if not SURROGATES.search(text):
        return text
    text = NOT_ESCAPED_BYTES.sub("\ufffd", text)
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def read_stdin() -> str:
    """All of standard input as text, decoded as UTF-8 with undecodable bytes replaced by U+FFFD."""
    buffer = getattr(sys.stdin, "buffer", None)
    text = buffer.read().decode("utf-8", errors="replace") if buffer is not None else sys.stdin.read()
    return clean_text(text)

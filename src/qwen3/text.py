"""Generated token ids to text, one id at a time: the one text layer behind generate_text, the engine and the server.

Two things make streamed text harder than `tokenizer.decode(ids)` at the end:
- a character may span several byte-level tokens; `StreamDecoder` (tokenizer.py) holds an incomplete one back;
- a stop string may arrive split over tokens ("EN" then "D"). Text that could be the beginning of a stop string
  is held back until the next token shows whether it is; when a stop string appears, the text ends just before
  it. So every piece `push` returns is final: the pieces concatenate to the finished text, and no piece ever
  shows characters that a stop string later cuts away.

End-of-sequence ids (`eos_token_ids`) and `stop_token_ids` end the stream without adding text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .tokenizer import Tokenizer


def safe_prefix_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be shown: all of it except a tail that might begin a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold


class TextStream:
    """push(token_id) -> the newly final text; `finish_reason` says why it ended ("eos": an EOS id, "stop": a
    stop string or a stop token id, None while it runs). After it finished, push returns "" and changes nothing.

    `finish()` ends a stream that ran out of tokens (max_tokens, an interrupt) and returns the held-back rest.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] = (),
        eos_token_ids: Iterable[int] = (),
        stop_token_ids: Iterable[int] = (),
        *,
        skip_special_tokens: bool = False,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop: stop strings must be non-empty")
        self.stop = tuple(stop)
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.stop_token_ids = frozenset(int(i) for i in stop_token_ids)
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._parts: list[str] = []  # the text so far, in pieces (joined when read: appending stays O(1) per token)
        self.shown = 0  # characters of `text` already returned
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        """Everything decoded so far (cut before a stop string once one is found)."""
        if len(self._parts) != 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0]

    @text.setter
    def text(self, value: str) -> None:
        self._parts[:] = [value]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int) -> str:
        if self.finish_reason is not None:
            return ""
        token_id = int(token_id)
        if token_id in self.eos_token_ids or token_id in self.stop_token_ids:
            self.finish_reason = "eos" if token_id in self.eos_token_ids else "stop"
            return self._release(flush=True)
        piece = self._decoder.push(token_id)
        if not self.stop:  # nothing to hold back: the piece is final (a server's common case, once per token)
            if piece:
                self._parts.append(piece)
                self.shown += len(piece)
            return piece
        self.text += piece
        # A new stop string can only end in the new text, so it starts at most len(stop) - 1 characters earlier.
        start = max(0, self.shown - self._longest_stop)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"
            return self._take(len(self.text))
        return self._take(safe_prefix_length(self.text, self.stop))

    def finish(self) -> str:
        """End the stream here (length limit or interrupt): the text held back so far, now final."""
        if self.finished:
            return ""
        return self._release(flush=True)

    def _release(self, flush: bool) -> str:
        if flush:
            self.text += self._decoder.flush()
        # The stream is over: held-back text can no longer become a stop string, except one completed by the flush.
        hits = [i for i in (self.text.find(s, max(0, self.shown - self._longest_stop)) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self.shown : upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return piece

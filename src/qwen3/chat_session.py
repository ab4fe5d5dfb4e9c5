"""`qwen3 chat`: the interactive loop, with a line editor, commands and a history kept inside the context.

Input. On a terminal, prompt_toolkit reads each line: arrow keys, the session's history (up/down), no
4,095-character limit (the terminal's own line editing cuts longer lines), and a paste of several lines
(bracketed paste) arrives as one message; Alt+Enter (or Esc, Enter) types a newline. Without a terminal
(piped input, tests), or on one that cannot draw (TERM=dumb), it is plain `input()`. Text that is not valid
UTF-8 becomes U+FFFD. Under `--tp` only rank 0 reads; the line reaches the other ranks through `on_rank0`.

Context. The prompt is the whole conversation, as ids from `Tokenizer.encode_chat`: the template's markers
are control tokens, and text typed by the user stays text even where it looks like one ("<|im_end|>"). The
answer gets `max_new_tokens` or the room left in the model's context, whichever is less. When less than
`reserve` tokens would be left, the oldest turns go (the system prompt stays) and one dim line says so; a
message too long for the context on its own is refused in one line. The chat never exits on either.

The decode path. With `engine` (the default on CUDA, see cli.py) the session keeps one engine LLM sized for this
one conversation (qwen3.engine.stream): its decode steps replay a CUDA graph, and each turn's prompt finds the
previous turns in the prefix cache, so only the new message is prefilled; the stats line says how many prompt
tokens were cached. Otherwise each answer is `generate_text` (the reference path; --compile, --tp, the CPU).

Reasoning is shown dimmed and apart from the answer (`ReasoningDimmer`). Some templates open the think block
themselves, ending the generation prompt with "<think>\\n" (the -Thinking-2507 models): then the completion
starts inside the reasoning and the dimmer starts in it too.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TextIO

from .chat import THINK_START, parse_completion
from .generate import generate_text
from .model import Qwen3ForCausalLM
from .parallel import on_rank0
from .sampling import SamplingParams
from .tokenizer import Tokenizer, valid_text

if TYPE_CHECKING:
    from .engine import LLM

DIM, RESET = "\x1b[2m", "\x1b[0m"
COMMANDS = {
    "/think": "thinking on for the next turns",
    "/no_think": "thinking off for the next turns",
    "/reset": "clear the history (the system prompt stays)",
    "/exit": "quit (also /quit or Ctrl-D)",
    "/help": "this list",
}
CHAT_HELP = "commands: /think and /no_think toggle thinking, /reset clears the history, /exit quits, /help lists them"
HELP_TEXT = "\n".join(
    [f"{name:<10} {what}" for name, what in COMMANDS.items()]
    + [
        "Typed inside a message, /think and /no_think act as the model's soft switch for that turn.",
        "Ctrl-C stops the answer and keeps the chat. A pasted block of lines is one message;"
        " Alt+Enter types a newline.",
    ]
)
_COMMAND = re.compile(r"/\w+")  # a line that is one /word is a command; "/think about x" is a message


class ReasoningDimmer:
    """Writes streamed text, showing the <think>...</think> part dimmed (on a terminal) and apart.
    `thinking=True` starts inside the reasoning: the prompt opened <think> itself."""

    def __init__(self, out: TextIO, color: bool, thinking: bool = False) -> None:
        self.out, self.color, self.pending, self.thinking = out, color, "", thinking
        if thinking and color:
            self.out.write(DIM)

    def __call__(self, chunk: str) -> None:
        self.pending += chunk
        while self.pending:
            tag = "</think>" if self.thinking else "<think>"
            at = self.pending.find(tag)
            if at < 0:
                keep = next((k for k in range(len(tag) - 1, 0, -1) if self.pending.endswith(tag[:k])), 0)
                self.write(self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep :]
                return
            self.write(self.pending[:at])
            self.pending = (
                self.pending[at + len(tag) :].lstrip("\n") if self.thinking else self.pending[at + len(tag) :]
            )
            self.thinking = not self.thinking
            if self.color:
                self.out.write(DIM if self.thinking else RESET)
            if not self.thinking:
                self.out.write("\n")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        self.write(self.pending)
        if self.color and self.thinking:
            self.write(RESET)
        self.pending, self.thinking = "", False


def opens_thinking(tok: Tokenizer, prompt_ids: Sequence[int]) -> bool:
    """Whether the generation prompt (after the last <|im_start|>) opens a <think> block it does not close."""
    ids = list(prompt_ids)
    start = len(ids) - ids[::-1].index(tok.im_start_id) if tok.im_start_id in ids else 0
    tail = ids[start:]
    if tok.think_start_id is None or tok.think_start_id not in tail:
        return False
    opened = len(tail) - tail[::-1].index(tok.think_start_id)
    return tok.think_end_id not in tail[opened:]


def capable_terminal(stdin: TextIO | None = None, stdout: TextIO | None = None) -> bool:
    """Both ends are a terminal that can draw (TERM=dumb: Emacs' shell and the like edit the line themselves)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    return stdin.isatty() and stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb"


def line_reader(stdin: TextIO | None = None, stdout: TextIO | None = None) -> Callable[[str], str]:
    """prompt(text) -> the line typed: prompt_toolkit on a capable terminal, else input()."""
    stdin = stdin or sys.stdin
    if not capable_terminal(stdin, stdout):
        if hasattr(stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as surrogates; valid_text replaces them
            stdin.reconfigure(errors="surrogateescape")
        return input
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event) -> None:  # noqa: ANN001 - prompt_toolkit's key event
        event.current_buffer.insert_text("\n")

    session = PromptSession(history=InMemoryHistory(), key_bindings=bindings, enable_open_in_editor=False)
    return lambda prompt: session.prompt(prompt)


@dataclass
class ChatSession:
    """One conversation: reads lines, runs commands, answers the rest. `run()` until /exit or end of input."""

    model: Qwen3ForCausalLM
    tok: Tokenizer
    sampling: SamplingParams
    max_new_tokens: int = 2048
    thinking: bool = True
    system: str | None = None
    compile: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    color: bool = False
    read_line: Callable[[str], str] = input
    history: list[dict] = field(default_factory=list)
    llm: LLM | None = None  # the engine path (one LLM for the whole conversation); None: generate_text
    max_model_len: int | None = None  # a context shorter than the model's (the engine's pool holds this many)

    def __post_init__(self) -> None:
        if self.system and not self.history:
            self.history = [{"role": "system", "content": self.system}]

    @property
    def context(self) -> int:
        if self.llm is not None:
            return self.llm.max_model_len
        limit = self.model.config.max_position_embeddings
        return min(limit, self.max_model_len) if self.max_model_len else limit

    @property
    def reserve(self) -> int:
        """Room kept for the answer before old turns are dropped: max_new_tokens, at most a quarter of the context."""
        return max(1, min(self.max_new_tokens, self.context // 4))

    def say(self, text: str, dim: bool = False) -> None:
        print(f"{DIM}{text}{RESET}" if dim and self.color else text, file=self.out, flush=True)

    def run(self) -> int:
        while True:
            prompt = "> " if self.thinking else "> [no_think] "
            try:
                line = on_rank0(partial(self.read_line, prompt))  # only rank 0 reads standard input
            except EOFError:
                self.say("")
                return 0
            except KeyboardInterrupt:
                self.say("")
                continue
            if not self.handle(valid_text(line)):
                return 0

    def handle(self, line: str) -> bool:
        """Run a command or answer a message; False to quit."""
        text = line.strip()
        if not text:
            return True
        if _COMMAND.fullmatch(text):
            return self.command(text)
        self.history.append({"role": "user", "content": text})
        try:
            prompt_ids = self.fit()
        except KeyboardInterrupt:  # Ctrl-C while encoding a long history: drop the turn, keep the chat
            self.history.pop()
            self.say("\n(interrupted)")
            return True
        if prompt_ids is not None:
            self.answer(prompt_ids)
        return True

    def command(self, name: str) -> bool:
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = self.history[:1] if self.system else []
            self.say("(history cleared)")
        elif name in ("/think", "/no_think"):
            self.thinking = name == "/think"
            self.say(f"(thinking {'on' if self.thinking else 'off'})")
        elif name == "/help":
            self.say(HELP_TEXT)
        else:
            self.say(f"(unknown command {name}; /help lists them)")
        return True

    def encode(self) -> list[int]:
        return self.tok.encode_chat(self.history, add_generation_prompt=True, enable_thinking=self.thinking)

    def fit(self) -> list[int] | None:
        """The prompt ids of the history, dropping its oldest turns if less than `reserve` tokens would be left for
        the answer; None (and the new message removed) if the message alone leaves no room."""
        first = 1 if self.system else 0
        alone = self.tok.encode_chat(
            [*self.history[:first], self.history[-1]], add_generation_prompt=True, enable_thinking=self.thinking
        )
        if len(alone) >= self.context:
            self.history.pop()
            self.say(f"(message not sent: {len(alone)} tokens, the model's context is {self.context})", dim=True)
            return None
        ids, dropped = self.encode(), 0
        while self.context - len(ids) < self.reserve and len(self.history) - first > 1:
            # One turn: the oldest user message and everything up to the next user message.
            end = next(i for i in range(first + 1, len(self.history)) if self.history[i]["role"] == "user")
            del self.history[first:end]
            ids, dropped = self.encode(), dropped + 1
        if dropped:
            turns = "turn" if dropped == 1 else f"{dropped} turns"
            self.say(f"(dropped the oldest {turns} to fit the model's context of {self.context} tokens)", dim=True)
        return ids

    def answer(self, prompt_ids: list[int]) -> None:
        thinking_open = opens_thinking(self.tok, prompt_ids)
        max_new = min(self.max_new_tokens, self.context - len(prompt_ids))
        dimmer = ReasoningDimmer(self.out, self.color, thinking=thinking_open)
        try:
            if self.llm is not None:
                from .engine.stream import complete

                completion = complete(self.llm, prompt_ids, max_new, self.sampling, on_text=dimmer, interruptible=True)
            else:
                completion = generate_text(self.model, self.tok, prompt_ids, max_new, self.sampling, on_text=dimmer,
                                           interruptible=True, compile=self.compile)  # fmt: skip
        except KeyboardInterrupt:  # Ctrl-C before the first token: drop the turn, keep the chat
            dimmer.close()
            self.history.pop()
            self.say("\n(interrupted)")
            return
        dimmer.close()
        # The template re-renders the turn from its parts (and drops the reasoning of earlier turns).
        text = (THINK_START + "\n" if thinking_open else "") + completion.text
        self.history.append(parse_completion(text).to_message())
        cached = getattr(completion, "num_cached_tokens", None)
        note = (f", {cached} cached" if cached is not None else "") + (
            " (interrupted)" if completion.finish_reason == "interrupted" else "")  # fmt: skip
        self.say(f"\n[{completion.completion_tokens} tokens, {completion.tokens_per_second:.1f} tok/s{note}]", dim=True)


def run_chat(
    model: Qwen3ForCausalLM,
    tok: Tokenizer,
    sampling: SamplingParams,
    *,
    name: str,
    max_new_tokens: int | None = None,
    thinking: bool = True,
    system: str | None = None,
    compile: bool = False,
    engine: bool = False,
    max_model_len: int | None = None,
    engine_options: dict[str, Any] | None = None,
) -> int:
    """`qwen3 chat` after loading: the banner, then the loop on standard input and output. `engine`: answer with
    one engine LLM for the session (its KV pool holds `max_model_len` tokens, default the model's context), built
    with `engine_options` (LLM's keyword arguments)."""
    if tok.chat_template is None:
        raise ValueError(f"{name}: the tokenizer has no chat template, which chat needs (qwen3 generate does not)")
    llm = None
    if engine:
        from .engine.stream import single_llm

        llm = single_llm(model, tok, max_model_len or model.config.max_position_embeddings, **(engine_options or {}))
    color = capable_terminal()
    print(f"qwen3 chat: {name} on {model.lm_head.weight.device} ({CHAT_HELP})", flush=True)
    session = ChatSession(
        model, tok, sampling, max_new_tokens=2048 if max_new_tokens is None else max_new_tokens, thinking=thinking,
        system=system, compile=compile, color=color, read_line=line_reader(), llm=llm, max_model_len=max_model_len,
    )  # fmt: skip
    return session.run()

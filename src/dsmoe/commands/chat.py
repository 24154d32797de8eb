"""Chat with a model in its chat format ("User: ...\n\nAssistant: ...").

Replies stream as they are produced; Ctrl-C stops a reply but keeps the session.
Commands: /reset clears the history, /exit (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import sys

from dsmoe.cli import CommandError
from dsmoe.commands._common import (add_model_arguments, add_sampling_arguments,
                                    load_model_and_tokenizer, new_token_budget, sampling_kwargs)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="optional system prompt")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.generate import generate
    from dsmoe.textstream import TextStreamer

    model, tokenizer = load_model_and_tokenizer(args)
    context = model.config.max_position_embeddings
    # Binary input (a file piped in, a stray paste) is read with U+FFFD for bad bytes
    # rather than ending the session with a UnicodeDecodeError.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    history: list[dict[str, str]] = []
    stops = list(args.stop) + ["\n\nUser:", "User:"]
    sampling = sampling_kwargs(args)
    max_new = args.max_new_tokens
    if max_new > context // 2:  # half the context at least stays for the conversation
        print(f"note: --max-new-tokens {max_new} capped at {context // 2}, half the model's "
              f"context of {context} tokens", file=sys.stderr)
        max_new = context // 2
    print("chat: /reset clears the history, /exit leaves, Ctrl-C stops a reply")
    while True:
        line = _read_turn()
        if line is None:
            return 0
        command = line.strip()
        if command == "/exit":
            return 0
        if command == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        ids = _prompt_ids(tokenizer, history, args.system, context - max_new)
        try:
            sampling["max_new_tokens"] = new_token_budget(len(ids), max_new, context)
        except CommandError as exc:  # one message longer than the context: refuse it, go on
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        streamer = TextStreamer(tokenizer, stops)
        print("\nAssistant: ", end="", flush=True)
        try:
            generate(model, torch.tensor([ids]), eos_token_id=tokenizer.eos_id,
                     streamer=streamer, **sampling)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        reply = streamer.finish().strip()
        print(flush=True)
        history.append({"role": "assistant", "content": reply})


def _read_turn() -> str | None:
    """The next user line; None at end of input."""
    while True:
        try:
            return input("\nUser: ")
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print("\n(use /exit to leave)")


def _prompt_ids(tokenizer, history: list[dict[str, str]], system: str | None,
                budget: int) -> list[int]:
    """The chat prompt's ids; the oldest turns are dropped while it exceeds ``budget``."""
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = tokenizer.encode_chat(messages)
        if len(ids) <= budget or len(history) <= 1:
            return ids
        del history[:2]  # one user turn and its reply

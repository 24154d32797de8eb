"""Chat with a model in its chat format ("User: ...\n\nAssistant: ...").

Replies stream as they are produced; Ctrl-C stops a reply but keeps the session.
Commands: /reset clears the history, /exit (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse

from dsmoe.commands._common import (add_model_arguments, add_sampling_arguments,
                                    load_model_and_tokenizer, sampling_kwargs)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="optional system prompt")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.generate import generate
    from dsmoe.textstream import TextStreamer

    model, tokenizer = load_model_and_tokenizer(args)
    history: list[dict[str, str]] = []
    stops = list(args.stop) + ["\n\nUser:", "User:"]
    print("chat: /reset clears the history, /exit leaves, Ctrl-C stops a reply")
    while True:
        try:
            line = input("\nUser: ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(use /exit to leave)")
            continue
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
        ids = _prompt_ids(tokenizer, history, args.system,
                          model.config.max_position_embeddings - args.max_new_tokens)
        streamer = TextStreamer(tokenizer, stops)
        print("\nAssistant: ", end="", flush=True)
        try:
            generate(model, torch.tensor([ids]), eos_token_id=tokenizer.eos_id,
                     streamer=streamer, **sampling_kwargs(args))
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        reply = streamer.finish().strip()
        print(flush=True)
        history.append({"role": "assistant", "content": reply})


def _prompt_ids(tokenizer, history: list[dict[str, str]], system: str | None,
                budget: int) -> list[int]:
    """The chat prompt's ids; the oldest turns are dropped while it exceeds ``budget``."""
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = tokenizer.encode_chat(messages)
        if len(ids) <= budget or len(history) <= 1:
            return ids
        del history[:2]  # one user turn and its reply

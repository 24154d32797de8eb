"""Generate text from a prompt, streaming tokens to the terminal as they are produced."""

from __future__ import annotations

import argparse

from dsmoe.commands._common import (add_model_arguments, add_sampling_arguments,
                                    load_model_and_tokenizer, new_token_budget, sampling_kwargs)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat format")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from dsmoe.generate import generate
    from dsmoe.textstream import TextStreamer

    model, tokenizer = load_model_and_tokenizer(args)
    if args.chat:
        ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    sampling = sampling_kwargs(args)
    sampling["max_new_tokens"] = new_token_budget(len(ids), args.max_new_tokens,
                                                  model.config.max_position_embeddings)
    streamer = TextStreamer(tokenizer, args.stop)
    print(args.prompt if not args.chat else "", end="", flush=True)
    try:
        generate(model, torch.tensor([ids]), eos_token_id=tokenizer.eos_id, streamer=streamer,
                 **sampling)
    finally:
        streamer.finish()
        print(flush=True)
    return 0

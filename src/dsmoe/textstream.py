"""Print generated tokens as text while they are produced, honouring stop strings.

Text that could still turn out to be the start of a stop string is held back until it
cannot, so a stop string is never printed, even when it spans several tokens.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import torch


class TextStreamer:
    """A ``generate`` streamer for batch size 1: decode, print, stop on a stop string."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (),
                 write: Callable[[str], object] | None = None) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.stops = [s for s in stop_strings if s]
        self.write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        self.text = ""  # everything decoded so far
        self.printed = 0  # how much of ``text`` has been written
        self.stopped = False

    def __call__(self, token: torch.Tensor) -> bool:
        self.text += self.decoder.push(int(token.reshape(-1)[0]))
        return self._emit(final=False)

    def finish(self) -> str:
        """Flush what is left; returns the reply text (without any stop string)."""
        if not self.stopped:
            self.text += self.decoder.flush()
            self._emit(final=True)
        return self.text

    def _emit(self, final: bool) -> bool:
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self._write_upto(len(self.text))
                self.stopped = True
                return True
        hold = 0 if final else max((len(s) - 1 for s in self.stops), default=0)
        self._write_upto(len(self.text) - hold)
        return False

    def _write_upto(self, end: int) -> None:
        if end > self.printed:
            self.write(self.text[self.printed:end])
            self.printed = end

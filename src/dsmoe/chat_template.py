"""Render a model's jinja2 chat template with bounded time and output.

A chat template comes with the model (tokenizer_config.json, a GGUF's metadata): it is code
from whoever published the file. jinja2's immutable sandbox (what transformers uses) stops
attribute tricks and mutation but not work: two nested ``range(100000)`` loops, or
``"x" * 10**10``, run for hours or fill memory. This module adds a budget on top:

- time: every attribute or item lookup, call, filter and arithmetic operation checks a
  deadline, so even a loop with an empty body is stopped within one inner ``range()``;
- size: ``*``, ``+``, ``**``, ``%`` and filter or method arguments that would build a string
  or list beyond the output budget are refused before they allocate, and the rendered text
  is counted chunk by chunk as jinja2 streams it.

The budget scales with the input (a long conversation renders long), and real templates
finish in milliseconds, far inside it. Exceeding it is a ValueError naming the limit.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any, Callable

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_SECONDS = 5.0
BASE_CHARS = 1 << 16  # output allowance beyond the input's own size
CHARS_PER_INPUT_CHAR = 8  # a template may repeat or decorate its input
_FORMAT_WIDTH = re.compile(r"(?:%|\{[^{}]*:)[^a-zA-Z{}%]*?(\d{7,})")  # widths >= 1e6


class TemplateBudgetError(ValueError):
    """A chat template ran past its time or output budget."""


def render(template: str, *, inputs_chars: int, globals_: dict[str, Any] | None = None,
           **context: Any) -> str:
    """``template`` rendered with ``context`` in a budgeted immutable sandbox."""
    max_chars = BASE_CHARS + CHARS_PER_INPUT_CHAR * (inputs_chars + len(template))
    env = _Budgeted(time.monotonic() + MAX_SECONDS, max_chars)
    env.globals.update(globals_ or {})
    try:
        pieces, size = [], 0
        for piece in env.from_string(template).generate(**context):
            size += len(piece)
            if size > max_chars:
                raise TemplateBudgetError(
                    f"chat template output exceeds {max_chars} characters (its budget for "
                    f"{inputs_chars} characters of messages); the template is runaway or hostile")
            env.tick()
            pieces.append(piece)
        return "".join(pieces)
    except TemplateError as exc:
        raise ValueError(f"cannot render the tokenizer's chat_template: {exc}") from exc
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise TemplateBudgetError(f"chat template: {type(exc).__name__} while rendering; the "
                                  "template is runaway or hostile") from None


class _Budgeted(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with a deadline and an output budget checked at every hook."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def __init__(self, deadline: float, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)  # transformers' options
        self.deadline, self.max_chars = deadline, max_chars
        for name, fn in list(self.filters.items()):
            self.filters[name] = _budgeted_filter(self, name, fn)

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"chat template ran longer than {MAX_SECONDS:g} s; "
                                      "the template is runaway or hostile")

    def check_size(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, bytes, list, tuple)) and len(value) > self.max_chars:
            raise TemplateBudgetError(f"chat template: {what} builds {len(value)} items, "
                                      f"over the {self.max_chars} output budget")
        return value

    def check_args(self, args: tuple, kwargs: dict, what: str) -> None:
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > self.max_chars:
                raise TemplateBudgetError(f"chat template: {what} with argument {arg}, "
                                          f"over the {self.max_chars} output budget")

    def check_format(self, fmt: Any, what: str) -> None:
        if isinstance(fmt, str) and _FORMAT_WIDTH.search(fmt):
            raise TemplateBudgetError(f"chat template: {what} with a field width over "
                                      "the output budget")

    # Reads are checked too: a value grown by '~' (not interceptable) in a namespace
    # is refused the next time the template reads it.
    def getattr(self, obj: Any, attribute: str) -> Any:
        self.tick()
        return self.check_size(super().getattr(obj, attribute), f"attribute {attribute!r}")

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.tick()
        return self.check_size(super().getitem(obj, argument), "an item")

    def call(__self, __context: Any, __obj: Any,  # noqa: N805 (jinja2's signature)
             *args: Any, **kwargs: Any) -> Any:
        __self.tick()
        owner = getattr(__obj, "__self__", None)  # "x".center(n), [..].pop(n): sized by n
        if isinstance(owner, (str, list)):
            __self.check_args(args, kwargs, "a call")
        if getattr(__obj, "__name__", None) in ("format", "format_map"):
            # the sandbox hands out str.format wrapped; __wrapped__ is the bound method
            fmt = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            __self.check_format(fmt, "str.format")
        return __self.check_size(super().call(__context, __obj, *args, **kwargs), "a call")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and \
                        len(seq) * n > self.max_chars:
                    raise TemplateBudgetError(f"chat template: '*' would build {len(seq) * n} "
                                              f"items, over the {self.max_chars} output budget")
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateBudgetError(f"chat template: exponent {right} is over 64")
        elif operator == "%":
            self.check_format(left, "'%' formatting")
        return self.check_size(super().call_binop(context, operator, left, right),
                               f"'{operator}'")


def _budgeted_filter(env: _Budgeted, name: str, fn: Callable) -> Callable:
    """``fn`` with the deadline and argument checks; wraps keeps jinja2's pass_* marker."""

    skip = 2 if getattr(fn, "jinja_pass_arg", None) is not None else 1  # context/env, value

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        env.tick()
        env.check_args(args[skip:], kwargs, f"filter {name!r}")
        if name == "format":
            env.check_format(args[skip - 1] if len(args) >= skip else None, "filter 'format'")
        return env.check_size(fn(*args, **kwargs), f"filter {name!r}")

    return wrapper

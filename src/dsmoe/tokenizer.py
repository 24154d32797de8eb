"""Tokenizer: an HF ``tokenizer.json`` (via the ``tokenizers`` library) plus the few facts
``tokenizer_config.json`` adds (BOS/EOS/PAD tokens, whether to prepend BOS, chat template).

Design choices:
- The Rust ``tokenizers`` object does all tokenization; this class only owns the facts that
  live outside ``tokenizer.json``. Encoding always calls it with ``add_special_tokens=False``
  and prepends BOS here, so ``add_bos`` (from ``add_bos_token``) is the single switch, as in
  transformers' Llama/DeepSeek tokenizers, whatever post-processor the file carries.
- ``train_bpe`` builds a byte-level BPE like DeepSeek's: no normalizer (decode(encode(s)) == s
  for any string), GPT-2 style pre-tokenization, DeepSeek's special tokens as BOS/EOS, EOS
  doubling as PAD. Its ``tokenizer.json`` also carries a BOS-prepending post-processor and
  ``save`` writes DeepSeek's jinja chat template, so transformers' ``AutoTokenizer`` loads the
  saved directory and produces the same ids and chat strings.
- Chat format: a ``chat_template`` from ``tokenizer_config.json`` is rendered with jinja2 (a
  dependency of torch, so normally present) in a sandbox, as transformers does, with a time
  and output budget (``dsmoe.chat_template``: templates ship inside model files). Without a
  template -- or without jinja2 when the template is DeepSeek's own -- the built-in
  DeepSeek-MoE format is used: ``bos [system "\\n\\n"] ("User: {u}\\n\\n" "Assistant: {a}eos")*``
  ending in ``"Assistant:"`` when a generation prompt is asked for.
- ``StreamDecoder`` re-decodes a short window of ids and only releases text once it no longer
  ends in U+FFFD, so byte-level tokens that split a UTF-8 character never print half of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dsmoe.io import atomic_write_text

BOS_TOKEN = "<｜begin▁of▁sentence｜>"  # DeepSeek's, from deepseek-moe-16b tokenizer_config.json
EOS_TOKEN = "<｜end▁of▁sentence｜>"

# deepseek-moe-16b-chat's template (the HF hub tokenizer_config.json), written by ``save`` so
# transformers reproduces ``apply_chat_template``; the built-in formatter below is its twin.
DEEPSEEK_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_DEEPSEEK_TEMPLATE_MARK = "'Assistant: ' + message['content'] + eos_token"
_CHAT_ROLES = ("system", "user", "assistant")
# Escapes for special-token text inside chat messages (Supplementary Private Use Area-A):
# _ESC _ESC is a literal _ESC, _ESC chr(_ESC_BASE + i) the i-th special token's text.
_ESC = "\U000F0000"
_ESC_BASE = 0xF0001

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer transformers save the template here


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus BOS/EOS/PAD ids, ``add_bos`` and the chat template."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict[str, Any] | None = None,
                 *, chat_template: str | None = None, default_add_bos: bool = False) -> None:
        """Prefer ``from_file`` / ``train_bpe``. ``config`` is a tokenizer_config.json dict;
        keys this class does not use are kept and written back by ``save``."""
        self._tok = tokenizer
        # User text never becomes control tokens: "<｜end▁of▁sentence｜>" typed in a prompt,
        # a chat or a data file is text. Only the chat template's own special tokens are
        # parsed (``chat_text``/``encode_chat_text``), or ``encode(parse_special=True)``.
        self._tok.encode_special_tokens = True
        specials = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values()
                           if t.special), key=len, reverse=True)
        self._specials: list[str] = specials
        self._special_index = {text: i for i, text in enumerate(specials)}
        self._special_split = (re.compile("(" + "|".join(map(re.escape, specials)) + ")")
                               if specials else None)
        self._config: dict[str, Any] = dict(config or {})
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_content(self._config.get("bos_token"), "bos_token")
        self.eos_token = _token_content(self._config.get("eos_token"), "eos_token")
        pad_token = _token_content(self._config.get("pad_token"), "pad_token")
        self.bos_id: int | None = self._token_id(self.bos_token, "bos_token")
        self.eos_id: int | None = self._token_id(self.eos_token, "eos_token")
        # DeepSeek pads with EOS; a tokenizer without a pad token does the same.
        self.pad_id: int | None = (self._token_id(pad_token, "pad_token") if pad_token
                                   else self.eos_id)
        add_bos = self._config.get("add_bos_token", default_add_bos)
        self.add_bos: bool = bool(add_bos) and self.bos_id is not None
        template = self._config.get("chat_template", chat_template)
        self.chat_template: str | None = _pick_template(template)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a directory holding ``tokenizer.json`` (and optionally ``tokenizer_config.json``,
        ``chat_template.jinja``), or a ``tokenizer.json`` path (config read from beside it).

        Without a tokenizer_config.json, BOS/EOS are DeepSeek's tokens when the vocabulary has
        them, and BOS is prepended iff the file's post-processor prepends it.
        """
        path = Path(path)
        if path.is_dir():
            directory, tok_path = path, path / TOKENIZER_FILE
            if not tok_path.is_file():
                raise FileNotFoundError(f"no {TOKENIZER_FILE} in tokenizer directory {path}")
        elif path.is_file():
            directory, tok_path = path.parent, path
        else:
            raise FileNotFoundError(f"tokenizer path does not exist: {path}")
        try:
            raw = tok_path.read_text(encoding="utf-8")
            tok = tokenizers.Tokenizer.from_str(raw)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read tokenizer file {tok_path}: {exc}") from exc
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{tok_path} is not a valid HF tokenizer.json: {exc}") from exc

        config: dict[str, Any] = {}
        config_path = directory / CONFIG_FILE
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"cannot parse {config_path}: {exc}") from exc
            if not isinstance(config, dict):
                raise ValueError(f"{config_path} must hold a JSON object, "
                                 f"found {type(config).__name__}")
        else:
            vocab = tok.get_vocab(with_added_tokens=True)
            for key, token in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN)):
                if token in vocab:
                    config[key] = token
        template_path = directory / CHAT_TEMPLATE_FILE
        try:
            template = (template_path.read_text(encoding="utf-8") if template_path.is_file()
                        else None)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {template_path}: {exc}") from exc
        bos = _token_content(config.get("bos_token"), "bos_token")
        return cls(tok, config, chat_template=template,
                   default_add_bos=_post_processor_prepends(json.loads(raw), bos))

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, *,
                  show_progress: bool = False) -> "Tokenizer":
        """Train a byte-level BPE of at most ``vocab_size`` tokens (256 byte symbols + 2
        specials + merges; fewer when the text runs out of pairs). Deterministic: the same
        texts in the same order give the same tokenizer.json."""
        n_base = len(pre_tokenizers.ByteLevel.alphabet()) + 2
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < n_base:
            raise ValueError(f"vocab_size must be an int >= {n_base} (256 byte symbols + BOS + "
                             f"EOS), got {vocab_size!r}")
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        n_chars = 0

        def counted() -> Iterator[str]:
            nonlocal n_chars
            for text in texts:
                if not isinstance(text, str):
                    raise ValueError(f"train_bpe expects strings, got {type(text).__name__}")
                n_chars += len(text)
                yield text

        tok.train_from_iterator(counted(), trainer)
        if n_chars == 0:
            raise ValueError("train_bpe got no text to train on (empty input)")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
            special_tokens=[(BOS_TOKEN, tok.token_to_id(BOS_TOKEN))])
        config = {"add_bos_token": True, "add_eos_token": False, "bos_token": BOS_TOKEN,
                  "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
                  "clean_up_tokenization_spaces": False,
                  "tokenizer_class": "PreTrainedTokenizerFast",
                  "chat_template": DEEPSEEK_CHAT_TEMPLATE}
        return cls(tok, config)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, add_bos: bool | None = None,
               parse_special: bool = False) -> list[int]:
        """Ids of ``text``; BOS first when ``add_bos`` (default: ``self.add_bos``). Special
        token text in ``text`` is plain text unless ``parse_special`` (trusted text only)."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        if parse_special:
            return self._with_bos(self._encode_parsed(text, unescape=False), add_bos)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: list[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """``[encode(t) for t in texts]``, tokenized in parallel by the Rust library."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"encode_batch: item {i} is {type(text).__name__}, not str")
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking, which we never use.
        batch_encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [self._with_bos(e.ids, add_bos) for e in batch_encode(texts,
                                                                      add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | Any, *, skip_special_tokens: bool = True) -> str:
        """Text of a 1-D id sequence (list, tuple, numpy array or tensor). Ids at or above
        ``vocab_size`` -- rows a model pads its embedding with (deepseek-moe-16b has 102400
        rows, more than its tokenizer's tokens) -- decode to nothing, as in HF; negative ids
        are an error."""
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> "StreamDecoder":
        """An incremental decoder for printing tokens as they are generated."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], *,
                            add_generation_prompt: bool = True) -> str:
        """The conversation as one prompt string (BOS text included at its start, so encode
        it with ``add_bos=False``, or use ``encode_chat``)."""
        _check_messages(messages, roles=None if self.chat_template else _CHAT_ROLES)
        if self.chat_template is not None:
            try:
                import jinja2  # noqa: F401  (a torch dependency; optional for this module)
            except ImportError:
                if _DEEPSEEK_TEMPLATE_MARK not in self.chat_template:
                    raise ValueError("this tokenizer's chat_template needs jinja2 "
                                     "(pip install jinja2)") from None
            else:
                return self._render_jinja(messages, add_generation_prompt)
        return self._render_deepseek(messages, add_generation_prompt)

    def chat_text(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """``apply_chat_template`` with the special-token text inside every message escaped
        (reversibly, into private-use characters), so the only special-token text left is
        the template's own. For ``encode_chat_text``; prefixes of one conversation render
        as prefixes, so turns can be located by string length as with the plain text."""
        _check_messages(messages, roles=None)
        escaped = [{**m, "content": self._escape(m["content"])} for m in messages]
        return self.apply_chat_template(escaped, add_generation_prompt=add_generation_prompt)

    def encode_chat_text(self, text: str) -> list[int]:
        """Ids of (a piece of) ``chat_text``: the template's special tokens are control
        tokens, the messages' text -- special-token look-alikes included -- is text."""
        return self._encode_parsed(text, unescape=True)

    def encode_chat(self, messages: list[dict], *,
                    add_generation_prompt: bool = True) -> list[int]:
        """Ids of the conversation in the chat format, with exactly one BOS (the template's);
        nothing a message says becomes a control token."""
        return self.encode_chat_text(self.chat_text(
            messages, add_generation_prompt=add_generation_prompt))

    def _escape(self, text: str) -> str:
        if self._special_split is None:
            return text
        text = text.replace(_ESC, _ESC + _ESC)
        return self._special_split.sub(
            lambda m: _ESC + chr(_ESC_BASE + self._special_index[m.group()]), text)

    def _unescape(self, text: str) -> str:
        def back(m: re.Match) -> str:
            code = ord(m.group(1)) - _ESC_BASE
            if m.group(1) == _ESC:
                return _ESC
            return self._specials[code] if 0 <= code < len(self._specials) else m.group()

        return re.sub(_ESC + "(.)", back, text, flags=re.S) if _ESC in text else text

    def _encode_parsed(self, text: str, *, unescape: bool) -> list[int]:
        """Split at special-token text (its ids), encode the rest as text. The same ids as
        the library's own special-token parsing, which also encodes between them apart."""
        if self._special_split is None:
            pieces = [text]
        else:
            pieces = self._special_split.split(text)  # odd positions: the special tokens
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self._tok.token_to_id(piece))
            elif piece:
                piece = self._unescape(piece) if unescape else piece
                ids.extend(self._tok.encode(piece, add_special_tokens=False).ids)
        return ids

    def _render_deepseek(self, messages: list[dict], add_generation_prompt: bool) -> str:
        parts = [self.bos_token or ""]
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                parts.append(content + "\n\n")
            elif role == "user":
                parts.append(f"User: {content}\n\n")
            else:
                if self.eos_token is None:
                    raise ValueError("the DeepSeek chat format ends assistant turns with EOS, "
                                     "but this tokenizer has no eos_token")
                parts.append(f"Assistant: {content}{self.eos_token}")
        if add_generation_prompt:
            parts.append("Assistant:")
        return "".join(parts)

    def _render_jinja(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from dsmoe.chat_template import render

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        return render(self.chat_template, inputs_chars=sum(len(m["content"]) for m in messages),
                      globals_={"raise_exception": raise_exception}, messages=messages,
                      add_generation_prompt=add_generation_prompt,
                      bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                      pad_token=self._token_text(self.pad_id))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_FILE, self._tok.to_str(pretty=True))
        config = dict(self._config)
        for key, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                           ("pad_token", self._token_text(self.pad_id))):
            # Keep the original entry (maybe an AddedToken dict) when it names the same token.
            if _token_content(config.get(key), key) != token:
                config[key] = token
        config["add_bos_token"] = self.add_bos
        config.setdefault("clean_up_tokenization_spaces", False)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(directory / CONFIG_FILE,
                           json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def to_json(self) -> str:
        """The ``tokenizer.json`` text (compact)."""
        return self._tok.to_str()

    def fingerprint(self) -> str:
        """sha256 over everything that changes the ids this tokenizer produces."""
        h = hashlib.sha256(self._tok.to_str().encode("utf-8"))
        # "specials as text": encode stopped parsing special-token text; older caches differ
        h.update(json.dumps([self.bos_id, self.eos_id, self.add_bos, "specials as text"]
                            ).encode("utf-8"))
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, add_bos={self.add_bos})")

    # ------------------------------------------------------------------ helpers
    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        add = self.add_bos if add_bos is None else add_bos
        if add:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos_token")
            return [self.bos_id, *ids]
        return list(ids)

    def _token_id(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json names {key} {token!r}, "
                             f"which is not in the tokenizer's vocabulary")
        return token_id

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tok.id_to_token(token_id)

    def _check_ids(self, ids: Sequence[int] | Any) -> list[int]:
        if hasattr(ids, "tolist"):  # torch.Tensor / numpy array
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        out = []
        for i in ids:
            if isinstance(i, (list, tuple)):
                raise ValueError("decode expects a 1-D sequence of token ids, got a nested one")
            i = int(i)
            if i < 0:
                raise ValueError(f"token ids must be >= 0, got {i}")
            out.append(i)
        return out


class StreamDecoder:
    """Turns a stream of token ids into text pieces whose concatenation equals ``decode``.

    Keeps ``ids`` and two offsets: text before ``prefix`` was printed long ago, text of
    ``ids[prefix:read]`` was printed last time. Each push decodes only ``ids[prefix:]``; the part
    beyond the already-printed text is released unless it ends in U+FFFD (an incomplete UTF-8
    character whose remaining bytes are in tokens still to come). ``flush`` releases the rest.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became printable (possibly "")."""
        self._ids.extend(self._tokenizer._check_ids([token_id]))
        new_text = self._pending()
        if not new_text or new_text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD)."""
        new_text = self._pending()
        self._prefix = self._read = len(self._ids)
        return new_text

    def _pending(self) -> str:
        decode = self._tokenizer._tok.decode
        window = self._ids[self._prefix:]
        printed = decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        text = decode(window, skip_special_tokens=self._skip)
        return text[len(printed):]


# ---------------------------------------------------------------------- module helpers
def _token_content(value: Any, key: str) -> str | None:
    """The token text of a tokenizer_config.json entry: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer_config.json {key} must be a string or an AddedToken object "
                     f"with a 'content' string, got {value!r}")


def _pick_template(template: Any) -> str | None:
    """Config templates are a string, or a list of {"name", "template"} (pick "default")."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(isinstance(t, dict) for t in template) and template:
        named = {t.get("name"): t.get("template") for t in template}
        chosen = named.get("default", template[0].get("template"))
        if isinstance(chosen, str):
            return chosen
    raise ValueError(f"tokenizer_config.json chat_template must be a string or a list of "
                     f"{{'name', 'template'}} objects, got {type(template).__name__}")


def _post_processor_prepends(tokenizer_json: dict[str, Any], bos: str | None) -> bool:
    """Whether tokenizer.json's post-processor puts ``bos`` before the text (how a
    tokenizer.json without tokenizer_config.json says "add BOS")."""
    if bos is None:
        return False
    stack = [tokenizer_json.get("post_processor")]
    while stack:
        proc = stack.pop()
        if not isinstance(proc, dict):
            continue
        if proc.get("type") == "Sequence":
            stack.extend(proc.get("processors", []))
        elif proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            first = single[0] if single else {}
            return first.get("SpecialToken", {}).get("id") == bos
    return False


def _check_messages(messages: list[dict], roles: tuple[str, ...] | None) -> None:
    """Messages are dicts with a str 'content' and a 'role' (one of ``roles`` when given)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', "
                             f"got {message!r}")
        if roles is not None and message["role"] not in roles:
            raise ValueError(f"message {i} has role {message['role']!r}; "
                             f"expected one of {', '.join(roles)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i} content must be a str, "
                             f"got {type(message['content']).__name__}")

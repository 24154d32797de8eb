"""Tokenizers in GGUF: ``tokenizer.ggml.*`` metadata <-> ``dsmoe.tokenizer.Tokenizer``.

llama.cpp stores a byte-level BPE ("gpt2" model) as a token list (id order), token types,
merges ("a b" strings, rank order), a pre-tokenizer name and the special token ids. Reading
rebuilds a ``tokenizers`` BPE from those lists; the pre-tokenizer name picks the split rules:

    gpt-2 / default   GPT-2's regex + byte-level mapping (what ``Tokenizer.train_bpe`` makes)
    deepseek-llm      DeepSeek LLM/MoE's split regexes (as llama.cpp lists them in
                      llama-vocab.cpp), then the byte-level mapping without a regex

dsmoe also writes the exact ``tokenizer.json`` under ``tokenizer.huggingface.json`` (a
standard GGUF key llama.cpp ignores); a reader prefers it, so a dsmoe round trip is exact
even for pre-tokenizers llama.cpp has no name for.

The token list must have exactly ``vocab_size`` entries for llama.cpp (it sizes the
embedding from it), so a tokenizer smaller than the model's vocabulary is padded with
``[PAD{i}]`` tokens of type UNUSED, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import gguf
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from dsmoe.tokenizer import Tokenizer

_K = gguf.Keys.Tokenizer
TT = gguf.TokenType

# llama.cpp's pre-tokenizers (llama-vocab.cpp, ``llm_tokenizer_bpe``): the text is split by each
# regex in turn, every match and every gap between matches becoming its own piece (tokenizers'
# ``Split(behavior="isolated")``), then mapped to byte-level symbols. "gpt-2" is GPT-2's regex,
# which ``ByteLevel(use_regex=True)`` applies.
# NOTE: six letters below are \u escapes because Unicode normalisation (an editor, a copy)
# turns them into other code points (U+1F7D -> U+03CE, U+212A KELVIN SIGN -> K, ...), which
# silently empties or widens the ranges they end.
DEEPSEEK_LLM_REGEXES = (
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-"
    "ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-"
    "ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
)
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    # llama.cpp's fallback: punctuation runs first, GPT-2's rule, then digit runs cut into
    # groups of three from the left ("12345" -> "123", "45").
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]"),
    "deepseek-llm": DEEPSEEK_LLM_REGEXES,
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"),
    "deepseek-v3": (
        r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
        r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""),
}
_GPT2_NAMES = ("gpt-2", "gpt2")
_NAMES = (*_GPT2_NAMES, *PRE_TOKENIZER_REGEXES)


@dataclass
class TokenizerData:
    """The tokenizer facts a GGUF file carries (llama.cpp's keys plus the optional HF JSON)."""

    tokens: list[str]  # [V] token text by id (byte-level strings)
    token_types: list[int]  # [V] gguf.TokenType values
    merges: list[str]  # "left right", in rank order
    pre: str = "gpt-2"
    model: str = "gpt2"
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    hf_json: str | None = None  # tokenizer.huggingface.json: exact, preferred when present

    # --- from / to dsmoe ---------------------------------------------------------------
    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, vocab_size: int | None = None
                       ) -> "TokenizerData":
        """The GGUF form of ``tokenizer``, padded to ``vocab_size`` tokens."""
        spec = json.loads(tokenizer.to_json())
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"GGUF export supports byte-level BPE tokenizers, this one is "
                             f"{model.get('type')!r}")
        by_id: dict[int, tuple[str, int]] = {i: (t, TT.NORMAL) for t, i in model["vocab"].items()}
        for added in spec.get("added_tokens") or []:
            kind = TT.CONTROL if added.get("special") else TT.USER_DEFINED
            by_id[int(added["id"])] = (added["content"], kind)
        size = max(max(by_id) + 1, vocab_size or 0)
        if vocab_size is not None and size > vocab_size:
            raise ValueError(f"the tokenizer has {size} tokens but the model's vocab_size is "
                             f"{vocab_size}: ids past the embedding cannot be exported")
        tokens, types = [], []
        for i in range(size):
            text, kind = by_id.get(i, (f"[PAD{i}]", TT.UNUSED))
            tokens.append(text)
            types.append(int(kind))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return cls(tokens=tokens, token_types=types, merges=merges,
                   pre=_pre_name(spec.get("pre_tokenizer")), bos_id=tokenizer.bos_id,
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, add_bos=tokenizer.add_bos,
                   chat_template=tokenizer.chat_template, hf_json=tokenizer.to_json())

    def to_tokenizer(self) -> Tokenizer:
        """A dsmoe Tokenizer: from the HF JSON when present, else rebuilt from the lists."""
        try:
            tok = (tokenizers.Tokenizer.from_str(self.hf_json) if self.hf_json is not None
                   else self._build_bpe())
        except ValueError:
            raise
        except Exception as exc:  # tokenizers raises bare Exceptions for bad JSON or merges
            what = _K.HF_JSON if self.hf_json is not None else f"{_K.LIST}/{_K.MERGES}"
            raise ValueError(f"{what} does not describe a valid tokenizer: {exc}") from exc
        config: dict[str, Any] = {"add_bos_token": self.add_bos, "add_eos_token": self.add_eos}
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                              ("pad_token", self.pad_id)):
            if token_id is not None and 0 <= token_id < len(self.tokens):
                config[key] = self.tokens[token_id]
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return Tokenizer(tok, config)

    def _build_bpe(self) -> tokenizers.Tokenizer:
        if self.model != "gpt2":
            raise ValueError(f"tokenizer model {self.model!r} is not supported: dsmoe rebuilds "
                             "byte-level BPE ('gpt2') tokenizers from GGUF metadata")
        vocab: dict[str, int] = {}
        for i, text in enumerate(self.tokens):
            if text in vocab:
                warnings.warn(f"GGUF token list repeats {text!r} (ids {vocab[text]} and {i}); "
                              "keeping the first", stacklevel=3)
                continue
            vocab[text] = i
        merges = []
        for rank, merge in enumerate(self.merges):
            cut = merge.find(" ", 1)  # llama.cpp's rule: the first space after position 0
            if cut < 0:
                raise ValueError(f"GGUF merge {rank} ({merge!r}) is not 'left right'")
            merges.append((merge[:cut], merge[cut + 1:]))
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _pre_tokenizer(self.pre)
        tok.decoder = decoders.ByteLevel()
        specials = [AddedToken(t, special=True, normalized=False)
                    for t, kind in zip(self.tokens, self.token_types) if kind == TT.CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, kind in zip(self.tokens, self.token_types) if kind == TT.USER_DEFINED]
        tok.add_special_tokens(specials)
        tok.add_tokens(user)
        return tok

    # --- GGUF metadata --------------------------------------------------------------------
    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for token_id, add in ((self.bos_id, writer.add_bos_token_id),
                              (self.eos_id, writer.add_eos_token_id),
                              (self.pad_id, writer.add_pad_token_id)):
            if token_id is not None:
                add(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)
        if self.hf_json is not None:
            writer.add_string(_K.HF_JSON, self.hf_json)

    @classmethod
    def read(cls, get: Callable[..., Any]) -> "TokenizerData | None":
        """From metadata (``get(key, default)``); None when the file has no token list. Each
        value's type is checked, and the special token ids must name tokens of the list."""
        tokens = _typed(get, _K.LIST, list, None, of=str)
        if tokens is None:
            return None
        types = _typed(get, _K.TOKEN_TYPE, list, None, of=int) or [int(TT.NORMAL)] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{_K.TOKEN_TYPE} has {len(types)} entries for {len(tokens)} tokens")
        ids = {}
        for name, key in (("bos_id", _K.BOS_ID), ("eos_id", _K.EOS_ID), ("pad_id", _K.PAD_ID)):
            ids[name] = _typed(get, key, int, None)
            if ids[name] is not None and not 0 <= ids[name] < len(tokens):
                raise ValueError(f"{key} = {ids[name]} is outside the vocabulary "
                                 f"({len(tokens)} tokens)")
        return cls(tokens=tokens, token_types=types,
                   merges=_typed(get, _K.MERGES, list, None, of=str) or [],
                   pre=_typed(get, _K.PRE, str, "default"),
                   model=_typed(get, _K.MODEL, str, "gpt2"),
                   add_bos=_typed(get, _K.ADD_BOS, bool, False),
                   add_eos=_typed(get, _K.ADD_EOS, bool, False),
                   chat_template=_typed(get, _K.CHAT_TEMPLATE, str, None),
                   hf_json=_typed(get, _K.HF_JSON, str, None), **ids)


def _typed(get: Callable[..., Any], key: str, kind: type, default: Any, *,
           of: type | None = None) -> Any:
    """``get(key, default)``, refused unless it is a ``kind`` (of ``of`` items)."""
    value = get(key, default)
    if value is None or value is default:
        return value
    wrong = (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind)
    if not wrong and of is not None:
        bad = next((v for v in value if isinstance(v, bool) or not isinstance(v, of)), None)
        if bad is not None:
            raise ValueError(f"{key} must hold {of.__name__} values, found "
                             f"{type(bad).__name__} {str(bad)[:40]!r}")
    if wrong:
        raise ValueError(f"{key} must be {kind.__name__}, not {type(value).__name__} "
                         f"{str(value)[:40]!r}")
    return value


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    if name in _GPT2_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in PRE_TOKENIZER_REGEXES:
        splits = [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated")
                  for r in PRE_TOKENIZER_REGEXES[name]]
        return pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"{_K.PRE} {name!r} is not supported (dsmoe knows {', '.join(_NAMES)}); "
                     f"the file carries no {_K.HF_JSON} to fall back on")


def _pre_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer ("default" when it has none)."""
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        regexes = tuple((p.get("pattern") or {}).get("Regex") for p in parts[:-1])
        for name, known in PRE_TOKENIZER_REGEXES.items():
            if regexes == known and parts and parts[-1].get("type") == "ByteLevel":
                return name
    warnings.warn("the tokenizer's pre-tokenizer has no llama.cpp name; writing 'default' "
                  "(llama.cpp may split text differently, dsmoe reads the exact tokenizer back)",
                  stacklevel=3)
    return "default"

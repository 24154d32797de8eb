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

# DeepSeek LLM's pre-tokenizer: split (isolating matches) by each regex in turn.
DEEPSEEK_LLM_REGEXES = (
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-"
    "ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-"
    "ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
)
_GPT2_NAMES = ("gpt-2", "gpt2", "default")


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
        if self.hf_json is not None:
            tok = tokenizers.Tokenizer.from_str(self.hf_json)
        else:
            tok = self._build_bpe()
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
        """From metadata (``get(key, default)``); None when the file has no token list."""
        tokens = get(_K.LIST, None)
        if tokens is None:
            return None
        types = get(_K.TOKEN_TYPE, None) or [int(TT.NORMAL)] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{_K.TOKEN_TYPE} has {len(types)} entries for {len(tokens)} tokens")
        return cls(tokens=tokens, token_types=[int(t) for t in types],
                   merges=get(_K.MERGES, None) or [], pre=get(_K.PRE, "default"),
                   model=get(_K.MODEL, "gpt2"), bos_id=get(_K.BOS_ID, None),
                   eos_id=get(_K.EOS_ID, None), pad_id=get(_K.PAD_ID, None),
                   add_bos=bool(get(_K.ADD_BOS, False)), add_eos=bool(get(_K.ADD_EOS, False)),
                   chat_template=get(_K.CHAT_TEMPLATE, None), hf_json=get(_K.HF_JSON, None))


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    if name in _GPT2_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "deepseek-llm":
        splits = [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated")
                  for r in DEEPSEEK_LLM_REGEXES]
        return pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"GGUF pre-tokenizer {name!r} is not supported (dsmoe knows "
                     f"{', '.join(_GPT2_NAMES)} and deepseek-llm); the file carries no "
                     "tokenizer.huggingface.json to fall back on")


def _pre_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer ("default" when it has none)."""
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        regexes = tuple((p.get("pattern") or {}).get("Regex") for p in parts[:-1])
        if regexes == DEEPSEEK_LLM_REGEXES and parts[-1].get("type") == "ByteLevel":
            return "deepseek-llm"
    warnings.warn("the tokenizer's pre-tokenizer has no llama.cpp name; writing 'default' "
                  "(llama.cpp may split text differently, dsmoe reads the exact tokenizer back)",
                  stacklevel=3)
    return "default"

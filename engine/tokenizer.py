"""The model's tokenizer and chat template, without transformers or torch.

The HTTP server imports this module, so it stays light: the Rust `tokenizers` library reads
tokenizer.json directly, and the chat template is rendered with jinja2 the way HF transformers'
`apply_chat_template` does (sandboxed environment, trim_blocks, lstrip_blocks, `raise_exception`,
a non-HTML-escaping `tojson`, special tokens passed as variables). tests/unit/test_tokenizer.py
checks both against `transformers.AutoTokenizer`.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

# The special-token names HF passes to chat templates as variables (its `special_tokens_map`).
_TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Encode/decode, token text for logprobs, special token ids, and the chat template of one model."""

    def __init__(self, tok: _HFTokenizer, tokenizer_config: dict, model_config: dict | None = None,
                 chat_template: str | None = None):
        self._tok = tok
        self._config = tokenizer_config
        self.chat_template = chat_template
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        """Token ids 0..vocab_size-1 are valid (added tokens included)."""
        added = tok.get_added_tokens_decoder()  # {id: AddedToken}
        self._added_text = {i: t.content for i, t in added.items()}
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._special_tokens = {name: _token_text(tokenizer_config.get(name)) for name in _TEMPLATE_TOKEN_NAMES}
        model_config = model_config or {}
        self.eos_token_id: int | None = self._resolve_id("eos_token", model_config.get("eos_token_id"))
        self.bos_token_id: int | None = self._resolve_id("bos_token", model_config.get("bos_token_id"))
        self.eos_token_ids: tuple[int, ...] = _eos_ids(self.eos_token_id, model_config.get("eos_token_id"))
        """Every id that ends generation: the tokenizer's eos plus config.json's (which may be a list)."""
        self._byte_level = _is_byte_level(tok)
        self._byte_decoder = _byte_decoder() if self._byte_level else None
        self._text_cache: dict[int, str] = {}

    # ------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, config.json, chat template)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        # Legacy layout: special tokens live in special_tokens_map.json; tokenizer_config wins when both say.
        for key, value in _read_json(path / "special_tokens_map.json").items():
            config.setdefault(key, value)
        return cls(tok, config, _read_json(path / "config.json"), _find_chat_template(path, config))

    def _resolve_id(self, name: str, fallback: Any) -> int | None:
        text = self._special_tokens.get(name)
        if text is not None:
            token_id = self._tok.token_to_id(text)
            if token_id is not None:
                return token_id
        if isinstance(fallback, list):
            return fallback[0] if fallback else None
        return fallback

    # ------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. '<|im_end|>') become their ids.

        add_special_tokens runs the tokenizer's own post-processor (a BOS for Llama-2 style models,
        nothing for SmolLM2). Chat prompts already carry their special tokens: encode them with False.
        """
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def max_token_id(self) -> int:
        return self.vocab_size - 1

    def check_token_ids(self, ids: Iterable[Any]) -> None:
        """Raise ValueError naming the first id that is not an int in [0, vocab_size)."""
        for pos, token_id in enumerate(ids):
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"token id {token_id!r} at position {pos} is out of range [0, {self.max_token_id}]"
                )

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range [0, {self.max_token_id}]")

    # ------------------------------------------------------------ per-token text (logprobs)

    def id_to_token(self, token_id: int) -> str:
        """The text of one token as OpenAI logprobs show it ('Ġhello' -> ' hello').

        A byte-level token holding part of a multi-byte character decodes to U+FFFD, as in vLLM;
        `token_bytes` gives its exact bytes.
        """
        text = self._text_cache.get(token_id)
        if text is None:
            raw = self._raw_bytes(token_id)
            text = self._added_text.get(token_id) or raw.decode("utf-8", errors="replace")
            self._text_cache[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> list[int]:
        """The UTF-8 bytes of one token (chat logprobs' `bytes` field); exact even for partial characters."""
        return list(self._raw_bytes(token_id))

    def _raw_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        if token_id in self._added_text:
            return self._added_text[token_id].encode("utf-8")
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_decoder is not None:
            # Byte-level BPE spells every byte as one printable char; map them back to the bytes.
            if all(ch in self._byte_decoder for ch in piece):
                return bytes(self._byte_decoder[ch] for ch in piece)
            return piece.encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        return piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece's '▁' is a space

    # ------------------------------------------------------------ chat template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` with the model's chat template, like HF `apply_chat_template(tokenize=False)`.

        Raises ValueError when the model has no chat template or the template rejects the messages
        (raise_exception, bad roles); the server maps that to HTTP 400.
        """
        if not self.chat_template:
            raise ValueError("this model has no chat template; use /v1/completions instead")
        # Like HF: a key set to None (OpenAI's content=None) is treated as absent.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {k: v for k, v in self._special_tokens.items() if v is not None}
        variables.update(kwargs)
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: e.g. content that is not a string
            raise ValueError(f"chat template error: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a chat: the template already writes the special tokens, so none are added."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


# ---------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _eos_ids(eos_token_id: int | None, config_eos: Any) -> tuple[int, ...]:
    ids = [eos_token_id] if eos_token_id is not None else []
    extra = config_eos if isinstance(config_eos, list) else [config_eos]
    ids += [i for i in extra if isinstance(i, int) and i not in ids]
    return tuple(ids)


def _find_chat_template(path: Path, config: dict) -> str | None:
    """chat_template.jinja (newer HF layout) first, else tokenizer_config.json's `chat_template`."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _is_byte_level(tok: _HFTokenizer) -> bool:
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    if decoder.get("type") == "ByteLevel":
        return True
    return any(d.get("type") == "ByteLevel" for d in decoder.get("decoders", []) if isinstance(d, dict))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable char -> the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; HF's (which templates are written against) does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    # Templates come from model repos: untrusted code, hence the immutable sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from e

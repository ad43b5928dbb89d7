"""engine.tokenizer against transformers.AutoTokenizer on the default model's tokenizer files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    " leading space and  double  spaces",
    "Unicode: café, naïve, 日本語のテキスト, emoji 😀👍🏽, math ∑∫",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # comment\n",
    "special <|im_start|>user\nhi<|im_end|> tokens <|endoftext|>",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?"},
    ],
    [
        {"role": "system", "content": "Multi-line\nsystem prompt 😀"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "second"},
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": "fourth"},
    ],
]

# A template exercising what real templates use: namespace, loop controls, tojson, raise_exception.
FANCY_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "{% set ns.n = ns.n + 1 %}"
    "[{{ m['role'] | upper }}] {{ m['content'] | trim }}\n"
    "{% if m.get('meta') %}{{ m['meta'] | tojson }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT #{{ ns.n }}]{% endif %}{{ eos_token if false else '' }}"
)


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def hf(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(tok, hf, text):
    for add in (True, False):
        ids = tok.encode(text, add_special_tokens=add)
        assert ids == hf.encode(text, add_special_tokens=add)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_tokens(tok, hf):
    assert tok.eos_token_id == hf.eos_token_id == 2
    assert tok.bos_token_id == hf.bos_token_id
    assert tok.vocab_size == len(hf) == 49152
    assert tok.max_token_id == 49151
    assert set(hf.all_special_ids) <= tok.special_token_ids
    assert 2 in tok.eos_token_ids
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [2]


def test_id_to_token_matches_single_id_decode(tok, hf):
    ids = list(range(0, 200)) + list(range(200, tok.vocab_size, 97))
    for i in ids:
        assert tok.id_to_token(i) == hf.decode([i], skip_special_tokens=False), i
    hello = tok.encode(" hello", add_special_tokens=False)
    assert len(hello) == 1 and tok.id_to_token(hello[0]) == " hello"
    assert hf.convert_ids_to_tokens(hello[0]) == "Ġhello"  # the raw BPE piece is not what logprobs show


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_concatenate_to_utf8(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    joined = bytes(b for i in ids for b in tok.token_bytes(i))
    assert joined == text.encode("utf-8")


def test_partial_character_token(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits the emoji
    assert tok.id_to_token(ids[0]) == "\ufffd"
    assert 0 < len(tok.token_bytes(ids[0])) < 4


def test_check_token_ids(tok):
    tok.check_token_ids([0, 5, tok.max_token_id])
    with pytest.raises(ValueError, match=r"49152.*position 2"):
        tok.check_token_ids([1, 2, 49152, -1])
    with pytest.raises(ValueError, match="-1"):
        tok.check_token_ids([-1])
    with pytest.raises(ValueError):
        tok.check_token_ids([1, "2"])
    with pytest.raises(ValueError):
        tok.check_token_ids([True])


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok, hf, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.encode_chat(messages, add_generation_prompt) == list(ids)


def _copy_tokenizer(src, dst, config_update=None, template=True):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(config_update or {})
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    if template:
        shutil.copy(src / "chat_template.jinja", dst / "chat_template.jinja")
    return dst


def test_template_from_tokenizer_config_matches_hf(default_model_dir, tmp_path):
    from transformers import AutoTokenizer

    d = _copy_tokenizer(default_model_dir, tmp_path / "m", {"chat_template": FANCY_TEMPLATE}, template=False)
    ours, theirs = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    messages = [
        {"role": "system", "content": "  sys  "},
        {"role": "user", "content": "<b>\"quoted\" & 'x'</b>", "meta": {"k": "é<>&", "n": [1, 2]}},
    ]
    for agp in (True, False):
        assert ours.apply_chat_template(messages, agp) == theirs.apply_chat_template(
            messages, add_generation_prompt=agp, tokenize=False
        )
    with pytest.raises(ValueError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_no_chat_template_raises(default_model_dir, tmp_path):
    d = _copy_tokenizer(default_model_dir, tmp_path / "bare", template=False)
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template is None
    assert tok.encode("hi") == Tokenizer.from_dir(default_model_dir).encode("hi")
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_none_valued_keys_are_dropped(tok):
    a = tok.apply_chat_template([{"role": "user", "content": "hi", "name": None}])
    assert a == tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_modules_import_without_torch():
    code = "import sys, engine.tokenizer, engine.detokenizer; assert 'torch' not in sys.modules; " \
           "assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_bad_messages_raise_value_error(tok):
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": 5}])
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user"}])

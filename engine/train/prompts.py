"""Training prompts built from text that ships with Python itself: nothing is downloaded.

Sources (both part of every CPython install, PSF license):
- the language reference topics of `pydoc_data.topics` (the text `help("assert")` prints): passages
  for summaries, passage QA, rewrites, bullet lists and translations;
- the source of pure-Python standard-library functions (`inspect.getsource`): code for type hints,
  explanations, docstrings, refactors and tests. textwrap, json and string are excluded: the
  benchmark's code-editing prompts (benchmarks/spec.py) are made from those modules;
- open prompts from templates: blog posts, stories, comparisons on the topics' names, and
  arithmetic word problems with random numbers.
The task mix mirrors Spec-Bench's categories (writing, QA, summarization, translation, RAG, math,
code) without using any of its prompts: `check_disjoint` drops every prompt that shares a run of
OVERLAP_WORDS words with Spec-Bench (both turns) or with the excluded modules' source.
"""
from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_MODULES = ("textwrap", "json", "string")
CODE_MODULES = (
    "heapq", "bisect", "fnmatch", "glob", "shutil", "calendar", "difflib", "csv", "statistics", "fractions",
    "base64", "colorsys", "html", "shlex", "pprint", "ipaddress", "dataclasses", "copy", "tokenize",
    "gettext", "queue", "sched", "secrets", "random", "posixpath", "functools", "collections", "contextlib",
    "argparse", "configparser", "urllib.parse", "email.utils", "zipfile", "tarfile", "getopt", "mimetypes",
    "platform", "locale", "traceback", "linecache", "inspect", "ast", "reprlib", "filecmp", "tempfile",
    "quopri", "codecs", "enum", "graphlib", "netrc", "plistlib", "wave", "uuid", "zipapp", "sysconfig",
)
OVERLAP_WORDS = 8
CODE_CHARS = (200, 1500)
PASSAGE_CHARS = (300, 1400)
LANGUAGES = ("French", "German", "Spanish", "Italian", "Portuguese", "Chinese", "Japanese", "Russian")
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena")

CODE_TASKS = (
    "Add type hints to this Python function and show the complete updated code:\n\n{code}",
    "Explain step by step what the following Python function does:\n\n{code}",
    "Write a clear docstring for this function and show the function with it:\n\n{code}",
    "Refactor this function to make it easier to read, without changing what it does:\n\n{code}",
    "Write three unit tests with pytest for this function:\n\n{code}",
)
PASSAGE_TASKS = (
    "Summarize the following passage in a few sentences:\n\n{text}",
    "Read the passage and answer the question.\n\nPassage:\n{text}\n\nQuestion: What is the main point of this passage?",
    "Rewrite the following text so that a beginner can understand it:\n\n{text}",
    "List the key facts stated in this text as bullet points:\n\n{text}",
    "Translate the following text into {language}:\n\n{sentences}",
)
OPEN_TASKS = (
    "Write a short blog post about {topic} in Python.",
    "Write a short story about a programmer who finally understands {topic} in Python.",
    "What are the advantages and disadvantages of {topic} in Python? Answer briefly.",
    "Explain {topic} in Python to a ten-year-old.",
    "{name} has {a} boxes with {b} pencils in each box and gives {c} pencils to friends. How many pencils "
    "are left? Explain your reasoning step by step.",
    "A train travels at {a} km/h for {b} hours and then at {c} km/h for one hour. How far does it go in "
    "total? Show your work.",
    "Compute {a} * {b} - {c} and explain each step.",
)


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    source: str  # "code:<module.function>", "doc:<topic>" or "open:<template index>"
    text: str


def doc_passages() -> list[tuple[str, str]]:
    """(topic, passage) chunks of the language reference topics, paragraphs packed to PASSAGE_CHARS."""
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        chunk = ""
        for para in re.split(r"\n\s*\n", topics[topic]):
            para = para.strip()
            if not para or set(para) <= {"*", "=", "-"}:
                continue
            chunk = f"{chunk}\n\n{para}" if chunk else para
            if len(chunk) >= PASSAGE_CHARS[0]:
                out.append((topic, chunk[:PASSAGE_CHARS[1]]))
                chunk = ""
    return out


def code_snippets() -> list[tuple[str, str]]:
    """(module.function, source) of pure-Python standard-library functions of moderate length."""
    out = []
    for module_name in CODE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(module).items()):
            if not inspect.isfunction(obj) or obj.__module__ != module.__name__:
                continue
            try:
                src = inspect.getsource(obj)
            except (OSError, TypeError):
                continue
            if CODE_CHARS[0] <= len(src) <= CODE_CHARS[1]:
                out.append((f"{module_name}.{name}", src))
    return out


def build_prompts(num_prompts: int, seed: int = 0) -> list[Prompt]:
    """A seeded mix: 35% code, 40% passages, 25% open prompts (before the disjointness filter)."""
    rng = random.Random(seed)
    code, passages = code_snippets(), doc_passages()
    rng.shuffle(code)
    rng.shuffle(passages)
    topics = sorted({topic.replace("-", " ") for topic, _ in passages})
    prompts = []
    for i in range(num_prompts):
        kind = rng.random()
        if kind < 0.35 and code:
            name, src = code[i % len(code)]
            text, source = rng.choice(CODE_TASKS).format(code=src), f"code:{name}"
        elif kind < 0.75 and passages:
            topic, passage = passages[i % len(passages)]
            sentences = " ".join(re.split(r"(?<=[.!?])\s+", passage.replace("\n", " "))[:3])
            text = rng.choice(PASSAGE_TASKS).format(text=passage, sentences=sentences,
                                                    language=rng.choice(LANGUAGES))
            source = f"doc:{topic}"
        else:
            index = rng.randrange(len(OPEN_TASKS))
            text = OPEN_TASKS[index].format(topic=rng.choice(topics), name=rng.choice(NAMES),
                                            a=rng.randint(3, 99), b=rng.randint(2, 30), c=rng.randint(1, 40))
            source = f"open:{index}"
        prompts.append(Prompt(f"p{seed}-{i:05d}", source, text))
    return prompts


# ---------------------------------------------------------------- disjointness


def _word_ngrams(text: str, n: int = OVERLAP_WORDS) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def evaluation_texts(spec_bench_dir: Path | None) -> list[str]:
    """Every Spec-Bench turn (when the data is there) and the excluded modules' source."""
    texts = []
    for module_name in EXCLUDED_MODULES:
        texts.append(inspect.getsource(importlib.import_module(module_name)))
    if spec_bench_dir is not None:
        for path in sorted(Path(spec_bench_dir).glob("spec_bench_*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                texts += row.get("turns") or [row.get("prompt", "")]
    return texts


def check_disjoint(prompts: list[Prompt], reference: list[str]) -> tuple[list[Prompt], list[Prompt]]:
    """(kept, dropped): a prompt is dropped when it shares an OVERLAP_WORDS-word run with the reference."""
    seen = set()
    for text in reference:
        seen |= _word_ngrams(text)
    kept, dropped = [], []
    for p in prompts:
        (dropped if _word_ngrams(p.text) & seen else kept).append(p)
    return kept, dropped

"""`stdlib-qa`: question–answer conversations mined from the standard library's docstrings.

Read with `ast` (nothing is imported). Question kinds, each recorded per example:
  what_does   "What does `json.dumps(obj, *, skipkeys=False, ...)` do?"   → the docstring's summary
  signature   "What are the parameters of `json.dumps`?"                  → the full signature
  which       "Which function in `json` would you use to: <summary>"      → the qualified name
  class       "What is `json.JSONDecoder`?"                               → the class docstring's summary
  module      "What is the `json` module for?"                            → the module docstring's summary
The split is by top-level package (`email.mime.text` goes with `email`), so validation questions come
from modules never trained on.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

from raytrain.data.packing import is_val_document
from raytrain.data.sources import stdlib_files

STDLIB_QA = "stdlib-qa"
STDLIB_PREFS = "stdlib-prefs"
STDLIB_KTO = "stdlib-kto"  # stdlib-prefs unpaired: each answer labelled desirable or not
SUMMARY_KINDS = ("what_does", "class", "module")  # answers that are prose, so wrong prose can compete
MIN_SUMMARY_CHARS = 24
MAX_SUMMARY_CHARS = 320
MAX_SIGNATURE_CHARS = 60
WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class QAPair:
    module: str
    kind: str
    question: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]


def summary(docstring: str | None) -> str | None:
    """The first paragraph, on one line; None when it says too little."""
    if not docstring:
        return None
    first = inspect.cleandoc(docstring).split("\n\n", 1)[0]
    text = WHITESPACE.sub(" ", first).strip()
    if len(text) < MIN_SUMMARY_CHARS or text.endswith(":") or ">>>" in text:  # no doctest sessions
        return None
    if len(text) > MAX_SUMMARY_CHARS:  # cut at the last sentence end that fits
        cut = text[:MAX_SUMMARY_CHARS].rfind(". ")
        if cut < MIN_SUMMARY_CHARS:
            return None
        text = text[: cut + 1]
    return text


def module_name(path: str, root: str) -> str:
    parts = list(Path(path).relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def short_signature(name: str, arguments: ast.arguments) -> str:
    full = f"{name}({ast.unparse(arguments)})"
    if len(full) <= MAX_SIGNATURE_CHARS:
        return full
    cut = full[:MAX_SIGNATURE_CHARS].rfind(", ")
    return full[:cut] + ", ...)" if cut > len(name) else f"{name}(...)"


def pairs_of_module(source: str, module: str) -> list[QAPair]:
    tree = ast.parse(source)
    pairs = []
    about = summary(ast.get_docstring(tree))
    if about:
        pairs.append(QAPair(module, "module", f"What is the `{module}` module for?", about))
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or node.name.startswith("_"):
            continue
        text = summary(ast.get_docstring(node))
        if text is None:
            continue
        qualified = f"{module}.{node.name}"
        if isinstance(node, ast.ClassDef):
            pairs.append(QAPair(module, "class", f"What is `{qualified}`?", text))
            continue
        pairs += [
            QAPair(module, "what_does", f"What does `{short_signature(qualified, node.args)}` do?", text),
            QAPair(module, "signature", f"What are the parameters of `{qualified}`?",
                   f"`{qualified}({ast.unparse(node.args)})`"),
            QAPair(module, "which", f"Which function in `{module}` would you use to: {text}", f"`{qualified}`"),
        ]
    return pairs


@functools.cache  # parsing ~700 files takes seconds; the demo and prefs ask again
def stdlib_qa() -> tuple[QAPair, ...]:
    """Every pair, in a fixed order (modules sorted, definitions in source order)."""
    root = sysconfig.get_paths()["stdlib"]
    pairs = []
    for path in stdlib_files():
        module = module_name(path, root)
        if any(part.startswith("_") for part in module.split(".")):
            continue  # private modules document implementation details
        try:
            pairs += pairs_of_module(Path(path).read_text(encoding="utf-8"), module)
        except (SyntaxError, UnicodeDecodeError):  # a few files are templates or other encodings
            continue
    return tuple(pairs)


@dataclass(frozen=True)
class PreferencePair:
    module: str
    kind: str  # how the rejected answer was made
    prompt: str
    chosen: str
    rejected: str


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def rejected_answers(pair: QAPair, others: list[str]) -> dict[str, str]:
    """Plausible wrong answers to `pair`, by kind: another definition's summary from the same module, the
    answer cut short, its sentences shuffled."""
    wrong = {}
    others = [o for o in others if o != pair.answer]
    if others:
        wrong["other_definition"] = others[zlib.crc32(pair.question.encode()) % len(others)]
    words = pair.answer.split()
    if len(words) >= 6:
        wrong["truncated"] = " ".join(words[: len(words) // 2])
    sentences = SENTENCE_END.split(pair.answer)
    if len(sentences) >= 2:
        wrong["shuffled"] = " ".join(sentences[1:] + sentences[:1])
    return wrong


def stdlib_prefs() -> list[PreferencePair]:
    """One preference pair per summary question of `stdlib_qa`: chosen is the true answer, rejected one wrong
    answer of a kind that rotates over the question's applicable kinds."""
    pairs = [p for p in stdlib_qa() if p.kind in SUMMARY_KINDS]
    by_module: dict[str, list[str]] = {}
    for p in pairs:
        by_module.setdefault(p.module, []).append(p.answer)
    result = []
    for p in pairs:
        wrong = rejected_answers(p, by_module[p.module])
        if wrong:
            kind = sorted(wrong)[zlib.crc32(p.question.encode()) % len(wrong)]
            result.append(PreferencePair(p.module, kind, p.question, p.answer, wrong[kind]))
    return result


def is_val_module(module: str, seed: int, val_fraction: float) -> bool:
    """Split by top-level package, so a val question's whole package is unseen in training."""
    return is_val_document(module.split(".")[0], seed, val_fraction)

"""A Hugging Face tokenizer's own chat template, rendered as transformers' `apply_chat_template` renders it, with
the loss mask on the assistant turns.

The template runs in jinja2's immutable sandbox with transformers' settings (trim_blocks, lstrip_blocks,
loopcontrols, raise_exception, tojson, strftime_now) and the tokenizer's special-token strings as variables, and the
rendered text is tokenized with its special tokens parsed and without added bos/eos, as `apply_chat_template` does,
so the ids are the same. Which characters are an assistant's reply comes from the template's `{% generation %}`
markers where it has them, else from rendering prefixes: reply i is what rendering turns[:i + 1] adds to rendering
turns[:i] with the generation prompt. A template for which that does not hold (one that rewrites earlier turns)
is refused with the fix (add generation markers). A reply's trained tokens run through its end-of-turn token and
stop there (ChatML's newline after <|im_end|> is not trained).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime

from tokenizers import Tokenizer

from raytrain.errors import DataError


def compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}`: records the character span of what it renders."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller):
            text = caller()
            tracker = self.environment.tracker
            if tracker is not None:
                start = len("".join(tracker["blocks"]))
                tracker["spans"].append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.tracker = None
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env, env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise DataError(f"the tokenizer's chat_template does not parse (line {exc.lineno}: {exc.message})") from None


class TemplateChat:
    """Conversations → (ids, trained) through a tokenizer's chat template."""

    def __init__(self, tokenizer: Tokenizer, template: str, variables: dict[str, str], source: str):
        self.tokenizer, self.variables, self.source = tokenizer, variables, source
        self.env, self.template = compile_template(template)
        self.has_markers = re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
        self.special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        self.end_of_turn: int | None = None
        self.end_of_turn = self._probe()

    def render(self, turns: Sequence[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        import jinja2

        tracker = {"blocks": [], "spans": []}
        self.env.tracker = tracker
        try:
            for block in self.template.generate(messages=list(turns), add_generation_prompt=add_generation_prompt,
                                                **self.variables):
                tracker["blocks"].append(block)
        except jinja2.exceptions.TemplateError as exc:
            raise DataError(f"the chat template of {self.source} refuses this conversation: {exc}") from None
        finally:
            self.env.tracker = None
        return "".join(tracker["blocks"]), tracker["spans"]

    def reply_spans(self, turns: Sequence[dict], text: str, marked: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if self.has_markers:
            return marked
        spans = []
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before, _ = self.render(turns[:i], add_generation_prompt=True)
            through, _ = self.render(turns[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(f"the chat template of {self.source} renders earlier turns differently once later "
                                "ones follow, so its assistant replies cannot be found by rendering prefixes; add "
                                "{% generation %}…{% endgeneration %} around the assistant content in its "
                                "chat_template")
            spans.append((len(before), len(through)))
        return spans

    def encode(self, turns: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        for number, turn in enumerate(turns, start=1):
            spelled = next((s for s in self.special if s in turn["content"]), None)
            if spelled:
                raise DataError(f"turn {number} ({turn['role']}) spells the special token {spelled!r}; the "
                                "template would read it as a control token: remove it from the text")
        text, marked = self.render(turns, add_generation_prompt)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        ids, trained = encoding.ids, [False] * len(encoding.ids)
        for start, end in self.reply_spans(turns, text, marked):
            inside = [i for i, (a, b) in enumerate(encoding.offsets) if start <= a < end and b > a]
            if self.end_of_turn is not None:  # through the reply's end-of-turn token, not what follows it
                stops = [i for i in inside if ids[i] == self.end_of_turn]
                inside = [i for i in inside if not stops or i <= stops[0]]
            for i in inside:
                trained[i] = True
        return ids, trained

    def _probe(self) -> int | None:
        """Checks the template renders a reply where it can be found, and finds its end-of-turn token: the last
        special token of a reply's tokens (<|im_end|>, <|eot_id|>, </s>), or None when replies end without one.
        One round: a template that rewrites earlier replies (Qwen3's drops their reasoning) still serves
        single-round data; a longer conversation it cannot mask is refused by record."""
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
        ids, trained = self.encode(turns)
        reply = [i for i, t in zip(ids, trained, strict=True) if t]
        if "Hello there" not in self.tokenizer.decode(reply, skip_special_tokens=True):
            raise DataError(f"the chat template of {self.source} does not render the assistant reply of [user, "
                            "assistant] messages; give the tokenizer a chat_template that does")
        special_ids = {self.tokenizer.token_to_id(s) for s in self.special}
        return next((i for i in reversed(reply) if i in special_ids), None)

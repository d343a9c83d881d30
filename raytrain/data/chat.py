"""raytrain's own chat format, on its tokenizer's special tokens (a Hugging Face tokenizer brings its own chat
template: data/chat_template.py).

A conversation is a list of `{role, content}` turns: an optional `system` turn, then `user` and
`assistant` turns alternating, starting with `user`. Each turn is `<|role|>` + content +
`<|eos|>`; a prompt for a reply ends with `<|assistant|>`:

    <|system|>Be brief.<|eos|><|user|>What does json.dumps do?<|eos|><|assistant|>Serialize obj …<|eos|>

SFT and preference data, `raytrain generate --chat`, PPO rollouts and the Hugging Face export
(`CHAT_TEMPLATE`, written into tokenizer_config.json) all render through this module, so
`transformers`' `apply_chat_template` gives exactly these token ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

from raytrain.errors import DataError

ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def check_conversation(messages: object, where: str, *, ends_with_reply: bool) -> list[dict[str, str]]:
    """The turns, or a DataError naming `where` (file:line) and what to fix."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    turns = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise DataError(f"{where}: turn {number} must be {{\"role\": ..., \"content\": ...}}, got {message!r}")
        role, content = message["role"], message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: turn {number} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: turn {number} ({role}) has no content; give it non-empty text")
        turns.append({"role": role, "content": content})
    expected = expected_roles(len(turns), starts_with_system=turns[0]["role"] == "system")
    actual = [t["role"] for t in turns]
    if actual != expected:
        raise DataError(f"{where}: roles {actual} are out of order; use an optional system turn, then user and "
                        "assistant turns alternating, starting with user")
    if ends_with_reply and actual[-1] != "assistant":
        raise DataError(f"{where}: the last turn is {actual[-1]!r}; a training conversation ends with an "
                        "assistant reply")
    return turns


def expected_roles(count: int, *, starts_with_system: bool) -> list[str]:
    head = ["system"] if starts_with_system else []
    return head + [("user", "assistant")[i % 2] for i in range(count - len(head))]


def encode_conversation(tokenizer: Tokenizer, turns: Sequence[dict[str, str]], *,
                        add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """(token ids, trained) where `trained[i]` says token i is an assistant token or its `<|eos|>`: the tokens
    SFT learns to produce. Content that spells a special token stays text (`load_tokenizer`)."""
    special = {name: tokenizer.token_to_id(f"<|{name}|>") for name in (*ROLES, "eos")}
    contents = tokenizer.encode_batch([t["content"] for t in turns], add_special_tokens=False)
    ids: list[int] = []
    trained: list[bool] = []
    for turn, content in zip(turns, contents, strict=True):
        reply = turn["role"] == "assistant"
        ids += [special[turn["role"]], *content.ids, special["eos"]]
        trained += [False] + [reply] * (len(content.ids) + 1)
    if add_generation_prompt:
        ids.append(special["assistant"])
        trained.append(False)
    return ids, trained


class NativeChat:
    """raytrain's chat format as a Vocabulary's chat (data/tokenizer.py); a reply ends with <|eos|>."""

    end_of_turn = None

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode(self, turns: Sequence[dict[str, str]], add_generation_prompt: bool = False):
        return encode_conversation(self.tokenizer, turns, add_generation_prompt=add_generation_prompt)

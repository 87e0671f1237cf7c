"""Chat-format examples (``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``,
single- or multi-turn): their validation, and where each assistant turn's tokens lie once the model's chat
template renders the conversation.

A conversation is rendered whole by the tokenizer's chat template; the tokens of assistant turn ``k`` are
those the template adds from the prompt that asks for that turn (``messages[:k]`` with the generation
prompt) to the conversation that ends with it (``messages[:k+1]``), its end-of-turn marker included, so
the model learns to stop. That needs a template that renders a conversation prefix by prefix, which is
checked, not assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..core.errors import DataError
from .schema import Example

ROLES = ("system", "user", "assistant")
Message = tuple[str, str]  # (role, content)


def parse_messages(value: Any, where: str) -> tuple[Message, ...]:
    """A row's ``messages`` as ``(role, content)`` pairs; DataError naming ``where`` (the example) when the
    conversation is malformed: not a list of role/content objects, an unknown role, no assistant turn."""
    if not isinstance(value, list | tuple) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    found = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {index} is not a {{role, content}} object")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: message {index} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {index} ({role}) has content that is not text")
        found.append((str(role), content))
    if not any(role == "assistant" for role, _ in found):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to attribute")
    return tuple(found)


def is_chat(examples: Sequence[Example]) -> bool:
    """Whether a task's examples are conversations (then a new query is one too)."""
    return any(e.messages for e in examples)


def query_example(example_id: str, prompt: str, response: str, label: str, chat: bool) -> Example:
    """A new prompt and answer to attribute: a one-turn conversation where the run's data are chats (so it
    is rendered, and its loss taken, as the training examples are), else a prompt/response pair."""
    messages = (("user", prompt), ("assistant", response)) if chat else ()
    return Example(example_id, prompt, response, label, messages)


def split_conversation(messages: Sequence[Message]) -> tuple[str, str]:
    """``(prompt, response)`` as text, for what reads an example as text (BM25, reports, the judge): the
    turns before the last assistant turn, one per line, and that turn's content."""
    last = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
    prompt = "\n".join(f"{role}: {content}" for role, content in messages[:last])
    return prompt, messages[last][1]


def chat_tokens(
    messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, where: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and the ``[start, end)`` token span of each assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat-format data needs a model whose tokenizer has a chat template")
    as_dicts = [{"role": role, "content": content} for role, content in messages]

    def ids(upto: int, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            as_dicts[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])

    full = ids(len(as_dicts), False)
    spans = []
    for k, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        start, upto = ids(k, True), ids(k + 1, False)
        if full[: len(upto)] != upto or upto[: len(start)] != start:
            raise DataError(
                f"{where}: the model's chat template does not render the conversation prefix by prefix, "
                "so its assistant turns cannot be located"
            )
        spans.append((len(start), len(upto)))
    return full, spans

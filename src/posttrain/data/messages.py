"""Chat messages as plain values: text of a message or reply, a prompt as a message list.

Prompts and completions reach rewards, judges and the world's gold reward in several shapes (a string, a message
dict, a message list; content as a string or as ``{"type": "text", "text": ...}`` parts); these functions read all
of them the same way.

Reasoning: an assistant message may carry its reasoning in a ``reasoning`` or ``thinking`` field, or as
``<think>...</think>`` at the start of its content; ``split_reasoning`` reads all three the same way.
"""

from __future__ import annotations

import re
from typing import Any

REASONING_FIELDS = ("reasoning", "thinking")
"""Fields of an assistant message that hold its reasoning (TRL / HF chat templates use both names)."""

_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)


def content_text(content: Any) -> str:
    """Message content as text (a list of ``{"type": "text", "text": ...}`` parts is joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def message_text(value: Any, role: str) -> str:
    """Text of a string, a message dict, or the last message of ``role`` in a list.

    A list without a message of ``role`` falls back to its last message.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return content_text(value.get("content"))
    messages = list(value)
    if not messages:
        return ""
    chosen = [m for m in messages if m.get("role") == role] or messages
    return content_text(chosen[-1].get("content"))


def to_messages(prompt: Any) -> list[dict]:
    """A prompt as a message list (a string is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def completion_text(completion: Any) -> str:
    """The reply's text: a string, a message dict, or the last assistant message of a list."""
    return message_text(completion, "assistant")


def reasoning_field(message: dict) -> str | None:
    """The name of the reasoning field ``message`` carries (``reasoning`` or ``thinking``), or None."""
    return next((name for name in REASONING_FIELDS if message.get(name) is not None), None)


def split_reasoning(message: dict) -> tuple[str | None, str]:
    """``(reasoning, content)`` of a message: the ``reasoning`` / ``thinking`` field, else a leading
    ``<think>...</think>`` of the content (removed from the content with the whitespace around it); None when the
    message has no reasoning. ``<think>`` must be closed (validated by ``posttrain.data.io.check_messages``)."""
    content = content_text(message.get("content"))
    if (name := reasoning_field(message)) is not None:
        return str(message[name]), content
    if (match := _THINK.match(content)) is not None:
        return match.group(1).strip(), content[match.end():]
    return None, content

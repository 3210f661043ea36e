"""Chat messages as plain values: text of a message or reply, a prompt as a message list, a full conversation.

Prompts and completions reach rewards, judges and the world's gold reward in several shapes (a string, a message
dict, a message list; content as a string or as ``{"type": "text", "text": ...}`` parts); these functions read all
of them the same way.
"""

from __future__ import annotations

from typing import Any


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


def conversation(prompt: Any, completion: Any) -> list[dict]:
    """prompt + the reply as one assistant turn."""
    return to_messages(prompt) + [{"role": "assistant", "content": completion_text(completion)}]

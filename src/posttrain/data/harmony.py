"""The harmony format (OpenAI's gpt-oss chat format) rendered from pieces, with exact loss masks, and its parser.

A conversation in posttrain's message schema (docs/rendering.md, "Harmony, reasoning and tool calls") becomes
harmony messages, each ``<|start|>{header}<|channel|>{channel}<|message|>{content}{close}``::

    <|start|>system<|message|># Valid channels: analysis, commentary, final. Channel must be included for every
    message.<|end|>                                                       (always first; the channels are all it says)
    system message        -> <|start|>developer<|message|># Instructions\\n\\n{content}<|end|>
    user message          -> <|start|>user<|message|>{content}<|end|>
    assistant reasoning   -> <|start|>assistant<|channel|>analysis<|message|>{reasoning}<|end|>
    assistant tool call   -> <|start|>assistant<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>
                             {arguments as compact JSON}<|call|>
    content beside calls  -> <|start|>assistant<|channel|>commentary<|message|>{content}<|end|>      (a preamble)
    assistant answer      -> <|start|>assistant<|channel|>final<|message|>{content}<|return|>  (the last message)
                                                                                 ... <|end|>     (any earlier one)
    tool result           -> <|start|>functions.{name} to=assistant<|channel|>commentary<|message|>{content}<|end|>

**Reasoning of earlier turns is dropped**, as openai-harmony does (its cookbook: "drop any previous CoT content on
subsequent sampling if the responses by the assistant ended in a message to the final channel"): only the assistant
messages after the last user (or system) message keep their ``analysis``, in training and in prompts alike, so a
tool-calling turn keeps its chain of thought across its tool results. The format is therefore not prefix-stable and
is rendered here, token ids built from pieces, never through the Jinja prefix check of ``render.py``.

**The mask** is 1 on what the model produces after the generation prompt ``<|start|>assistant``: each trained
assistant message's ``<|channel|>...<|message|>{content}`` and its closing token (``<|end|>``, ``<|call|>``,
``<|return|>``), plus the ``<|start|>assistant`` of a message that follows an assistant message closed by ``<|end|>``
(``<|end|>`` does not stop sampling: the model writes the next header itself). ``<|call|>`` and ``<|return|>`` stop
sampling, so the header after them is prompt. One exception: an earlier turn's ``final`` message is trained without its
closing ``<|end|>`` (the model ended it with ``<|return|>``, which the history rewrites to ``<|end|>``; training that
``<|end|>`` would teach the model not to stop after an answer).

Text between two special tokens (role names, channels, contents) is tokenized on its own, special-token strings in it
as text (``split_special_tokens=True``, through ``render.py``'s private backend copy): a content that spells
``<|end|>`` can never end its message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

from posttrain.data.messages import content_text, split_reasoning
from posttrain.data.templates import HARMONY_TOKENS

START, CHANNEL, MESSAGE, END, CALL, RETURN, CONSTRAIN = HARMONY_TOKENS
STOP_TOKENS = (RETURN, CALL)
"""Tokens that stop sampling: the answer is done, or a tool must run (``<|end|>`` does not stop: more follows)."""
SYSTEM_TEXT = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
GENERATION_PROMPT = (START, "assistant")


class HarmonyError(ValueError):
    """A conversation harmony cannot render (a tool result whose tool cannot be named, a bad tool name)."""


@dataclass
class Part:
    """One harmony message. ``pieces``: its header as alternating text and special tokens, from ``<|start|>`` to
    ``<|message|>``; ``content``: text; ``close``: its closing token. ``source``: the index of the conversation
    message it renders; ``assistant``: written by the model; ``close_trained``: whether its closing token is."""

    pieces: list[str]
    content: str
    close: str
    source: int
    assistant: bool = False
    close_trained: bool = True


def _tool_name(name: str, where: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise HarmonyError(f"{where}: tool name {name!r} must be letters, digits, '_', '.' or '-' in harmony")
    return name


def _arguments(arguments: Any) -> str:
    """Tool-call arguments as compact JSON (a JSON string is used as given)."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False, separators=(",", ":"))


def _result_tool(messages: Sequence[dict], i: int) -> str:
    """The tool a tool message answers: its ``name``; else the call whose ``id`` is its ``tool_call_id``; else the
    only call of the assistant message before it."""
    message = messages[i]
    if message.get("name"):
        return _tool_name(message["name"], f"message {i} (tool) name")
    calls_before = [(j, c) for j in range(i) for c in messages[j].get("tool_calls") or []]
    wanted = message.get("tool_call_id")
    if wanted is not None:
        for _, call in calls_before:
            if call.get("id") == wanted:
                return _tool_name(call["function"]["name"], f"message {i} (tool)")
        raise HarmonyError(f"message {i} (tool): no earlier tool call has id {wanted!r}")
    last = max((j for j in range(i) if messages[j].get("role") == "assistant"), default=None)
    calls = (messages[last].get("tool_calls") or []) if last is not None else []
    if len(calls) == 1:
        return _tool_name(calls[0]["function"]["name"], f"message {i} (tool)")
    raise HarmonyError(f"message {i} (tool): give it a 'name' or a 'tool_call_id' (the assistant message before it "
                       f"makes {len(calls)} tool calls)")


def harmony_parts(messages: Sequence[dict], *, training: bool) -> list[Part]:
    """The harmony messages of a conversation. ``training``: the conversation's last message, when it is a final
    answer, closes with ``<|return|>`` (as openai-harmony's ``render_conversation_for_training``); otherwise every
    final answer closes with ``<|end|>`` (a prompt's history)."""
    parts = [Part([START, "system", MESSAGE], SYSTEM_TEXT, END, -1)]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "system")), default=-1)
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            parts.append(Part([START, "developer", MESSAGE], f"# Instructions\n\n{content_text(message['content'])}",
                              END, i))
        elif role == "user":
            parts.append(Part([START, "user", MESSAGE], content_text(message.get("content")), END, i))
        elif role == "tool":
            name = _result_tool(messages, i)
            parts.append(Part([START, f"functions.{name} to=assistant", CHANNEL, "commentary", MESSAGE],
                              content_text(message.get("content")), END, i))
        elif role == "assistant":
            reasoning, content = split_reasoning(message)
            calls = message.get("tool_calls") or []
            header = [START, "assistant", CHANNEL]
            if reasoning is not None and i > last_user:  # earlier turns' reasoning is dropped
                parts.append(Part(header + ["analysis", MESSAGE], reasoning, END, i, assistant=True))
            if calls:
                if content.strip():
                    parts.append(Part(header + ["commentary", MESSAGE], content, END, i, assistant=True))
                for j, call in enumerate(calls):
                    name = _tool_name(call["function"]["name"], f"message {i} tool call {j}")
                    parts.append(Part(header + [f"commentary to=functions.{name} ", CONSTRAIN, "json", MESSAGE],
                                      _arguments(call["function"].get("arguments")), CALL, i, assistant=True))
            else:
                last = training and i == len(messages) - 1
                parts.append(Part(header + ["final", MESSAGE], content, RETURN if last else END, i, assistant=True,
                                  close_trained=last or i > last_user))
        else:
            raise HarmonyError(f"message {i}: unknown role {role!r} (expected system, user, assistant or tool)")
    return parts


def _token_ids(tokenizer) -> dict[str, int]:
    """The ids of the harmony tokens, which must be special tokens of ``tokenizer``."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in HARMONY_TOKENS if t not in vocab]
    if missing:
        name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
        raise HarmonyError(f"tokenizer {name!r} lacks the harmony tokens {missing}: use "
                           "set_chat_template(tokenizer, 'harmony') or --chat_template harmony, which add them")
    return {t: vocab[t] for t in HARMONY_TOKENS}


class _Builder:
    """Token ids, mask, character offsets and text, appended piece by piece."""

    def __init__(self, tokenizer, as_text):
        self.special = _token_ids(tokenizer)
        self.as_text = as_text  # a tokenizers.Tokenizer that keeps special-token strings as text
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.offsets: list[tuple[int, int]] = []
        self.text = ""

    def add(self, piece: str, trained: bool, special: bool = False) -> None:
        """Append ``piece``: one harmony token when ``special`` (the format's own), else text, tokenized with
        special-token strings as text (a content that is exactly ``<|end|>`` stays text)."""
        start = len(self.text)
        if special:
            ids, offsets = [self.special[piece]], [(0, len(piece))]
        elif piece:
            encoded = self.as_text.encode(piece, add_special_tokens=False)
            ids, offsets = encoded.ids, encoded.offsets
        else:
            return
        self.ids += ids
        self.mask += [int(trained)] * len(ids)
        self.offsets += [(a + start, b + start) for a, b in offsets]
        self.text += piece


def _trained_sources(messages: Sequence[dict], strategy: str) -> set[int]:
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return set(assistant[-1:] if strategy == "final_turn_only" else assistant)


def render_harmony(tokenizer, messages: Sequence[dict], strategy: str, *, as_text):
    """``(input_ids, loss_mask, offsets, text, spans)`` of a conversation rendered for training (see the module
    docstring for the mask); ``spans``: ``(part, content_start, content_end)`` per harmony message, in characters.
    ``as_text``: the tokenizer's backend copy that tokenizes special-token strings as text (``render.py`` passes
    it; use ``posttrain.data.render_conversation``)."""
    if not messages:
        raise ValueError("empty conversation")
    trained_sources = _trained_sources(messages, strategy)
    build = _Builder(tokenizer, as_text)
    spans = []
    previous: Part | None = None
    for part in harmony_parts(messages, training=True):
        trained = part.assistant and part.source in trained_sources
        # the model writes <|start|>assistant itself after an assistant message it closed with <|end|>
        continued = trained and previous is not None and previous.assistant and previous.close == END
        for k, piece in enumerate(part.pieces):
            build.add(piece, trained and (k >= 2 or continued), special=piece in HARMONY_TOKENS)
        content_start = len(build.text)
        build.add(part.content, trained)
        spans.append((part, content_start, len(build.text)))
        build.add(part.close, trained and part.close_trained, special=True)
        previous = part
    return build.ids, build.mask, build.offsets, build.text, spans


def render_harmony_prompt(tokenizer, messages: Sequence[dict], *, as_text) -> list[int]:
    """Token ids of ``messages`` (a prompt's history: final answers closed by ``<|end|>``, reasoning kept only after
    the last user message) followed by the generation prompt ``<|start|>assistant``."""
    build = _Builder(tokenizer, as_text)
    for part in harmony_parts(messages, training=False):
        for piece in part.pieces:
            build.add(piece, False, special=piece in HARMONY_TOKENS)
        build.add(part.content, False)
        build.add(part.close, False, special=True)
    for piece in GENERATION_PROMPT:
        build.add(piece, False, special=piece in HARMONY_TOKENS)
    return build.ids


def stop_token_ids(tokenizer) -> list[int]:
    """``<|return|>`` and ``<|call|>``: where sampling a harmony reply stops."""
    special = _token_ids(tokenizer)
    return sorted(special[t] for t in STOP_TOKENS)


# --------------------------------------------------------------------------
# parsing generated text

_MESSAGE_RE = re.compile(r"<\|start\|>(.*?)<\|message\|>(.*?)(?:<\|end\|>|<\|call\|>|<\|return\|>|(?=<\|start\|>)|$)",
                         re.S)
# a channel glued to its content: "analysis" before any non-space (no English word continues it), "final" before
# anything but a space or a lower-case letter ("finally", "finalize")
_SKIPPED_START = re.compile(r"analysis(?=\S)|final(?=[^\sa-z])|commentary to=")
_SKIPPED_SPLIT = re.compile(r"assistant(?=analysis|commentary|final)")  # the content may start in lower case
_SKIPPED_HEADER = re.compile(r"(analysis|commentary|final)(?: to=(\S+) ?(?:json)?)?")


def is_harmony(text: str) -> bool:
    """Whether ``text`` reads as a harmony reply: with its special tokens (``<|channel|>``), or as decoded with
    ``skip_special_tokens=True``: ``analysis`` glued to its content (``analysisUser asks...``, ``analysiswe need``),
    ``final`` glued to a content that does not start with a lower-case letter (``finalThe answer...``; not
    "finally"), or ``commentary to=``. Plain prose ("final answer: 5", "analysis of ...") is not harmony."""
    if CHANNEL in text or MESSAGE in text:
        return True
    text = text.lstrip()
    return bool(_SKIPPED_START.match(text)) or (text.startswith("analysis") and bool(_SKIPPED_SPLIT.search(text)))


def _header(header: str) -> tuple[str | None, str | None]:
    """(channel, recipient) of a message header such as ``assistant<|channel|>commentary to=functions.f
    <|constrain|>json`` (the recipient may also sit beside the role)."""
    role, _, channel_part = header.partition(CHANNEL)
    channel_part = channel_part.replace(CONSTRAIN, " ")
    words = channel_part.split()
    channel = words[0] if words else None
    recipient = next((w[3:] for w in role.split() + words if w.startswith("to=")), None)
    return channel, recipient


def _call(recipient: str | None, content: str) -> dict | None:
    if not recipient or not recipient.startswith("functions."):
        return None
    try:
        arguments = json.loads(content)
    except ValueError:
        arguments = content
    return {"type": "function", "function": {"name": recipient.removeprefix("functions."), "arguments": arguments}}


def parse_harmony(text: str) -> dict:
    """A generated harmony reply as ``{"analysis": str, "final": str | None, "tool_calls": [...]}``.

    ``text`` is what an engine returns: the completion after the prompt's ``<|start|>assistant``, with or without
    its special tokens (posttrain's engines decode with ``skip_special_tokens=True``, which leaves
    ``analysis{reasoning}assistantfinal{answer}``; then a message starts at a channel name glued to ``assistant``).
    ``analysis``: the analysis messages joined by newlines; ``final``: the last final message (None when there is
    none, e.g. a reply cut off while reasoning); ``tool_calls``: the messages addressed ``to=functions.NAME``, in the
    HF / TRL schema, with arguments parsed as JSON when they are JSON. Text that is not harmony (``is_harmony``)
    parses as ``{"analysis": "", "final": None, "tool_calls": []}``."""
    messages: list[tuple[str | None, str | None, str]] = []  # (channel, recipient, content)
    if not is_harmony(text):
        pass
    elif CHANNEL in text or MESSAGE in text:
        body = text if text.lstrip().startswith(START) else START + "assistant" + text
        for match in _MESSAGE_RE.finditer(body):
            channel, recipient = _header(match.group(1))
            messages.append((channel, recipient, match.group(2)))
    else:
        for segment in _SKIPPED_SPLIT.split(text.strip()):
            header = _SKIPPED_HEADER.match(segment)
            if header is None:
                continue
            messages.append((header.group(1), header.group(2), segment[header.end():]))
    analysis = [content for channel, _, content in messages if channel == "analysis"]
    finals = [content for channel, _, content in messages if channel == "final"]
    calls = [call for channel, recipient, content in messages if (call := _call(recipient, content)) is not None]
    return {"analysis": "\n".join(analysis), "final": finals[-1] if finals else None, "tool_calls": calls}


def answer_text(text: str) -> str:
    """The answer part of a reply: the ``final`` channel of a harmony reply ("" when it has none), the text after a
    leading ``<think>...</think>`` ("" when the think block is never closed), else ``text`` itself."""
    if is_harmony(text):
        final = parse_harmony(text)["final"]
        return "" if final is None else final
    stripped = text.lstrip()
    if stripped.startswith("<think>"):
        end = stripped.find("</think>")
        return "" if end < 0 else stripped[end + len("</think>"):].lstrip()
    return text


def completion_message(completion: Any) -> dict:
    """A generated reply as the assistant message to train on or to score: a harmony reply (as the engine decodes
    it, special tokens skipped) becomes ``{"content": its final answer, "reasoning": its analysis, "tool_calls":
    its calls}``, so that rendering it again puts each part back in its channel (not the decoded text, channel
    names and all, into the final channel); any other string is the content as it is; a message dict (or the last
    assistant message of a list) is kept as it is."""
    if isinstance(completion, list) and completion and all(isinstance(m, dict) for m in completion):
        completion = ([m for m in completion if m.get("role") == "assistant"] or completion)[-1]
    if isinstance(completion, dict):
        return {**completion, "role": "assistant"}
    text = content_text(completion)
    if not is_harmony(text):
        return {"role": "assistant", "content": text}
    parsed = parse_harmony(text)
    message = {"role": "assistant", "content": parsed["final"] or ""}
    if parsed["analysis"]:
        message["reasoning"] = parsed["analysis"]
    if parsed["tool_calls"]:
        message["tool_calls"] = parsed["tool_calls"]
    return message

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

**Tokenization.** The ids are those of the whole rendered text as the tokenizer encodes it in one call,
``tokenizer(text, add_special_tokens=False)`` (what a server that tokenizes the rendered prompt feeds the model), not
pieces tokenized apart and joined: the tokenizers library cuts a text at its added tokens and handles each stretch
between them on its own (``added_vocabulary.rs``), but a stretch's tokens can depend on where it sits. A ``Metaspace``
pre-tokenizer with ``prepend_scheme="first"`` (transformers' Llama / Mistral SentencePiece conversions with
``legacy=False``) prefixes "▁" only to a stretch at the start of the string (``metaspace.rs``), so every piece encoded
alone gained a "▁" the whole string has not; an ``AddedToken`` with ``lstrip`` / ``rstrip`` takes the whitespace beside
it into the token. (``prepend_scheme="always"``, the legacy ``Prepend("▁")`` normalizer and byte-level
``add_prefix_space=True`` prefix every stretch alike, alone or not.) tests/test_harmony.py checks the ids and mask
against that one-call encoding on each of these kinds. Tokenizing the whole string and masking by character offsets
would not keep a content that spells ``<|end|>`` as text; so the format's own tokens are written into the text as
private-use placeholders, which a copy of the tokenizer's text-only backend (``render.py``'s: it tokenizes special-token
strings as text, as ``split_special_tokens=True``) knows as added tokens with the flags of the tokens they stand for: it
cuts and strips exactly where the tokenizer does, and a spelled ``<|end|>`` can never end its message. A token's mask
bit is that of the piece it comes from, found by order (pieces alternate between harmony tokens and text, and no text
token crosses a harmony token), which no offset quirk (a "▁" or a stripped space given to a neighbour) can shift.
Refused (``HarmonyError``, a bad row): a content that spells a whole placeholder, and, as ``render.py`` refuses it, a
tokenizer that makes a special token out of a content's text.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from posttrain.data.io import UNPAIRED_SURROGATE
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
    wanted = message.get("tool_call_id")
    if wanted is not None:  # the nearest earlier call with that id (scanning back: no list of every call per message)
        for j in range(i - 1, -1, -1):
            for call in messages[j].get("tool_calls") or []:
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


# Each harmony token is written into the text to tokenize as a placeholder of its own length (so character offsets
# carry over): a private-use character of its own, then a filler that no placeholder starts with, so that a
# placeholder can only match where one was written (a content spelling a whole one is caught by the order check).
_PLACEHOLDERS = {t: chr(0xE100 + k) + "\ue1ff" * (len(t) - 1) for k, t in enumerate(HARMONY_TOKENS)}
_IN_CONTEXT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # text-only backend -> _in_context(it)
_IN_CONTEXT_LOCK = threading.Lock()


def _in_context(as_text):
    """``(backend, {placeholder id: harmony token}, {special token id: its string})``. ``backend``: a copy of
    ``as_text`` (special-token strings are text) that also knows each placeholder as a non-special added token with
    the flags (lstrip, rstrip, single_word, normalized) of the harmony token it stands for, so it cuts and strips
    the text around it as the tokenizer does around that token. Built once per backend, then only read (encoding is
    safe from any thread)."""
    with _IN_CONTEXT_LOCK:
        cached = _IN_CONTEXT.get(as_text)
        if cached is None:
            from tokenizers import AddedToken, Tokenizer

            backend = Tokenizer.from_str(as_text.to_str())
            backend.encode_special_tokens = True  # not kept by to_str
            added = {str(t.content): t for t in as_text.get_added_tokens_decoder().values()}
            for token, placeholder in _PLACEHOLDERS.items():
                original = added.get(token)
                flags = ({"normalized": False} if original is None else  # in the model's vocabulary, not added
                         {"single_word": original.single_word, "lstrip": original.lstrip, "rstrip": original.rstrip,
                          "normalized": original.normalized})
                backend.add_tokens([AddedToken(placeholder, special=False, **flags)])
            placeholders = {backend.token_to_id(p): t for t, p in _PLACEHOLDERS.items()}
            specials = {i: str(t.content) for i, t in as_text.get_added_tokens_decoder().items() if t.special}
            cached = _IN_CONTEXT[as_text] = (backend, placeholders, specials)
        return cached


class _Builder:
    """The rendered text piece by piece, each piece a harmony token or text with its mask bit; ``encode`` tokenizes
    it in one piece (module docstring, "Tokenization")."""

    def __init__(self, tokenizer, as_text):
        self.special = _token_ids(tokenizer)
        self.as_text = as_text  # a tokenizers.Tokenizer that keeps special-token strings as text
        self.pieces: list[tuple[str, bool, bool]] = []  # (text, is a harmony token, trained)
        self.length = 0

    def add(self, piece: str, trained: bool, special: bool = False) -> None:
        """Append ``piece``: one harmony token when ``special`` (the format's own), else text (never right after
        text: ``encode`` relies on the alternation)."""
        if piece:
            assert special or not self.pieces or self.pieces[-1][1], "two text pieces in a row"
            self.pieces.append((piece, special, trained))
            self.length += len(piece)

    def encode(self) -> tuple[list[int], list[int], list[tuple[int, int]], str]:
        """``(input_ids, loss_mask, offsets, text)``. Pieces alternate between harmony tokens and text, so a text
        token belongs to the text piece after the last harmony token before it."""
        backend, harmony_token, specials = _in_context(self.as_text)
        text = "".join(piece for piece, _, _ in self.pieces)
        written = "".join(_PLACEHOLDERS[piece] if special else piece for piece, special, _ in self.pieces)
        try:
            encoding = backend.encode(written, add_special_tokens=False)
        except TypeError as err:  # the Rust tokenizer rejects str with lone surrogates with a TypeError
            if UNPAIRED_SURROGATE.search(text):
                raise HarmonyError("the conversation holds an unpaired surrogate (e.g. a lone \\ud800 escape): not "
                                   "valid Unicode text") from err
            raise
        ids, mask = [], []
        written_tokens = [k for k, (_, special, _) in enumerate(self.pieces) if special]  # pieces, in order
        placed = 0  # harmony tokens met so far
        current = -1  # the piece of the last one
        for token, (start, end) in zip(encoding.ids, encoding.offsets):
            name = harmony_token.get(token)
            if name is not None:  # a harmony token: it must be the next one written
                if placed == len(written_tokens) or self.pieces[written_tokens[placed]][0] != name:
                    break
                current = written_tokens[placed]
                placed += 1
                ids.append(self.special[name])
                mask.append(int(self.pieces[current][2]))
            else:
                following = self.pieces[current + 1] if current + 1 < len(self.pieces) else None
                if following is None or following[1]:
                    break
                if token in specials and text[start:end] == specials[token]:  # spelled, not an unknown character
                    raise HarmonyError(f"the tokenizer makes the special token {specials[token]!r} from plain text, "
                                       "so it cannot be kept as text inside a message; remove it from the data")
                ids.append(token)
                mask.append(int(following[2]))
        if len(ids) != len(encoding.ids) or placed != len(written_tokens):
            raise HarmonyError("the harmony tokens could not be placed in the tokenized text (a content spells "
                               "posttrain's private-use placeholder U+E100..U+E1FF, or the tokenizer normalizes the "
                               "harmony tokens away)")
        return ids, mask, [tuple(o) for o in encoding.offsets], text


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
        content_start = build.length
        build.add(part.content, trained)
        spans.append((part, content_start, build.length))
        build.add(part.close, trained and part.close_trained, special=True)
        previous = part
    ids, mask, offsets, text = build.encode()
    return ids, mask, offsets, text, spans


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
    return build.encode()[0]


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
    """A commentary message addressed ``to=functions.NAME`` as a tool call (arguments parsed when they are JSON, else
    the text as written, e.g. cut off); None for other recipients and for a NAME that could not be rendered back."""
    if not recipient or not recipient.startswith("functions."):
        return None
    try:
        _tool_name(recipient.removeprefix("functions."), "a tool call's recipient")
    except HarmonyError:
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
    return parsed_message(parse_harmony(text)) if is_harmony(text) else {"role": "assistant", "content": text}


def parsed_message(parsed: dict) -> dict:
    """A parsed harmony reply (``parse_harmony`` / ``parse_completion``) as posttrain's assistant message: content the
    final answer ("" without one), ``reasoning`` the analysis, ``tool_calls`` in the HF / TRL schema."""
    message = {"role": "assistant", "content": parsed["final"] or ""}
    if parsed["analysis"]:
        message["reasoning"] = parsed["analysis"]
    if parsed["tool_calls"]:
        message["tool_calls"] = parsed["tool_calls"]
    return message


def parse_completion(tokenizer, completion) -> dict | None:
    """An engine's completion (``token_ids``, ``content_ids``, ``finish_reason``) of a harmony prompt as
    ``parse_harmony`` reads it (``{"analysis", "final", "tool_calls"}``) plus ``"called"``: whether the reply ended by
    calling a tool (generation stopped at ``<|call|>`` after a call to ``functions.NAME``), so a tool must now run. The
    tokens are decoded with their special tokens kept, so channel names and recipients are never mistaken for
    content. None when the reply does not read as harmony at all (an untrained model's): it is then plain text."""
    text = tokenizer.decode(completion.content_ids, skip_special_tokens=False)  # without the stop token
    if not is_harmony(text):
        return None
    parsed = parse_harmony(text)
    stopped_at_call = (completion.finish_reason == "stop" and completion.token_ids
                       and completion.token_ids[-1] == tokenizer.convert_tokens_to_ids(CALL))
    return {**parsed, "called": bool(stopped_at_call and parsed["tool_calls"])}

"""The one rendering path: a conversation -> (input_ids, loss_mask), and a prompt -> input_ids.

Every stage (pretraining excepted) renders through these two functions, so training and generation can never
disagree on the template.

How the mask is found (no string slicing of the conversation itself):
  for each assistant turn i the template renders three texts,
      prefix_i  = render(messages[:i], add_generation_prompt=True)   # everything before the reply
      through_i = render(messages[:i+1])                              # ... the reply and its end-of-turn
      full      = render(messages)
  and we require ``full.startswith(through_i)`` and ``through_i.startswith(prefix_i)`` (prefix stability). The
  trained character span is [len(prefix_i), len(prefix_i) + reply_end), where reply_end covers the rendered content
  and the template's end-of-turn up to and including its first special token (``<|im_end|>``, ``</s>``, ...);
  a template with no special end-of-turn token trains the whole suffix it writes after the content.
  ``full`` is tokenized once, exactly as ``apply_chat_template(tokenize=True)`` does (no extra special tokens), and
  a token is masked in when its character span overlaps a trained span.

Message content is always text (docs/rendering.md, "Special-token strings in content"): a special-token string
inside a content (``<|im_end|>`` typed by a user) is tokenized as ordinary text, as HF's ``split_special_tokens=True``
would, while the special tokens the template writes stay special. Contents without special-token strings take the
single-tokenization path above unchanged; the others are located in the text by rendering placeholders in their
place, and the text is tokenized in stretches cut at the template's own special tokens, each stretch by a private copy
of the tokenizer's Rust backend with ``encode_special_tokens`` set (``split_special_tokens=True`` would flip that
setting on the SHARED backend, which ``posttrain serve`` tokenizes with from several threads at once).

Reasoning (a ``reasoning`` / ``thinking`` field of an assistant message) reaches a Jinja template that has a slot for
it (one that reads ``reasoning_content`` or ``thinking``) under that name; any other template gets it folded into the
content as ``<think>{reasoning}</think>\\n{content}``, trained like the rest of the reply.

The harmony format (``--chat_template harmony``) is not a Jinja template: it drops earlier turns' reasoning, so it is
rendered from pieces by ``posttrain.data.harmony`` with exact masks; these functions dispatch to it.

What rendering needs of a tokenizer's special tokens (their strings, ids, one regex, that backend copy) is computed
once per tokenizer and cached (again when its vocabulary or special tokens change): it runs for every example.
"""

from __future__ import annotations

import re
import threading
import weakref
from enum import StrEnum
from typing import Any, Sequence

from jinja2 import TemplateError

from posttrain.data import harmony
from posttrain.data.io import UNPAIRED_SURROGATE
from posttrain.data.messages import reasoning_field
from posttrain.data.templates import HARMONY

Message = dict[str, Any]


class MultiTurnStrategy(StrEnum):
    all_assistant_turns = "all_assistant_turns"  # train every assistant turn (user/system/tool turns masked)
    final_turn_only = "final_turn_only"  # train only the last assistant turn


class TemplateNotPrefixStableError(ValueError):
    """Rendering a longer conversation changed the text of its earlier turns, so a mask cannot be trusted."""


class RenderError(ValueError):
    """The chat template could not render the conversation (e.g. it rejected the role order)."""


def template_name(tokenizer, chat_template: str | None = None) -> str:
    """A short human name for the template in use (built-in name, or the first characters of the Jinja)."""
    from posttrain.data.templates import CHAT_TEMPLATES

    template = chat_template or getattr(tokenizer, "chat_template", None) or ""
    for name, text in CHAT_TEMPLATES.items():
        if template == text:
            return name
    name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
    snippet = template[:60].replace("\n", "\\n")
    return f"{name} chat template ({snippet}...)"


def uses_harmony(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the template in use is harmony (``--chat_template harmony``: the marker ``HARMONY``)."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    return template in (HARMONY, "harmony")


def _harmony_call(function, *args, **kwargs):
    """``function`` of ``posttrain.data.harmony`` with this tokenizer's text-only backend; its errors as
    ``RenderError`` (a bad row for the loaders)."""
    tokenizer = args[0]
    try:
        return function(*args, as_text=_specials(tokenizer).as_text(tokenizer), **kwargs)
    except harmony.HarmonyError as err:
        raise RenderError(f"harmony: {err}") from err


def _reads_field(template: str, name: str) -> bool:
    """Whether a Jinja template reads a message's field ``name`` (``message.thinking``, ``m['thinking']``), not
    merely mentions the word (``enable_thinking``, ``/think``)."""
    return re.search(rf"""\.{name}\b|\[\s*['"]{name}['"]\s*\]""", template) is not None


def with_reasoning_for(messages: Sequence[Message], template: str | None) -> list[Message]:
    """``messages`` as a Jinja template sees them: an assistant's ``reasoning`` / ``thinking`` field goes to the
    template's own reasoning slot (``reasoning_content`` or ``thinking``) when it reads one, else it is folded into
    the content as ``<think>{reasoning}</think>\\n{content}``. Messages without reasoning are passed unchanged."""
    if not any(m.get("role") == "assistant" and reasoning_field(m) for m in messages):
        return list(messages)
    template = template or ""
    slot = next((name for name in ("reasoning_content", "thinking") if _reads_field(template, name)), None)
    out = []
    for m in messages:
        name = reasoning_field(m) if m.get("role") == "assistant" else None
        if name is None:
            out.append(m)
            continue
        rest = {k: v for k, v in m.items() if k != name}
        if slot is not None:
            out.append({**rest, slot: m[name]})
        else:
            out.append({**rest, "content": f"<think>{m[name]}</think>\n{m.get('content') or ''}"})
    return out


def _render_text(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool, chat_template=None) -> str:
    if getattr(tokenizer, "chat_template", None) is None and chat_template is None:
        raise RenderError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set one with "
            "posttrain.data.templates.set_chat_template(tokenizer, 'chatml' | 'zephyr' | 'tulu') or --chat_template"
        )
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
        )
    except TemplateError as err:  # raise_exception(...) inside the template, e.g. roles must alternate
        raise RenderError(f"{template_name(tokenizer, chat_template)} rejected the conversation: {err}") from err


class _Specials:
    """A tokenizer's special tokens as rendering uses them: ``strings`` (every special / added-special token, longest
    first, so `</s>` never shadows a longer one), their ``ids``, and ``find``, one regex search for any of them."""

    def __init__(self, tokenizer, fingerprint):
        self.fingerprint = fingerprint
        strings = set(tokenizer.all_special_tokens)
        for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if getattr(token, "special", False):
                strings.add(str(token))
        self.strings = sorted((s for s in strings if s), key=lambda s: (-len(s), s))
        self.ids = frozenset(tokenizer.convert_tokens_to_ids(self.strings))
        # an alternation tries its branches in order: at the leftmost match, the longest special token wins
        self._pattern = re.compile("|".join(map(re.escape, self.strings))) if self.strings else None
        self._as_text = None
        self._lock = threading.Lock()

    def find(self, text: str, start: int = 0) -> re.Match | None:
        """The leftmost special-token string in ``text[start:]`` (the longest one there), or None."""
        return self._pattern.search(text, start) if self._pattern is not None else None

    def as_text(self, tokenizer):
        """A private copy of the tokenizer's Rust backend that tokenizes special-token strings as text: the ids and
        offsets of ``tokenizer(text, split_special_tokens=True)`` (tested), without switching the shared backend."""
        with self._lock:  # built once, then only read (encode borrows it immutably: safe from any thread)
            if self._as_text is None:
                from tokenizers import Tokenizer

                backend = getattr(tokenizer, "backend_tokenizer", None)
                if backend is None:
                    raise RenderError(f"{type(tokenizer).__name__} is not a fast tokenizer: special-token strings "
                                      "in message contents cannot be tokenized as text")
                as_text = Tokenizer.from_str(backend.to_str())
                as_text.encode_special_tokens = True
                as_text.no_truncation()
                as_text.no_padding()
                self._as_text = as_text
            return self._as_text


_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _Specials


def _specials(tokenizer) -> _Specials:
    """The cached ``_Specials`` of ``tokenizer``, rebuilt when tokens were added or its special tokens changed."""
    fingerprint = (len(tokenizer), getattr(tokenizer, "special_tokens_map", None))
    try:
        cached = _SPECIALS.get(tokenizer)
    except TypeError:  # an object that cannot be weakly referenced: no cache
        return _Specials(tokenizer, fingerprint)
    if cached is None or cached.fingerprint != fingerprint:
        cached = _SPECIALS[tokenizer] = _Specials(tokenizer, fingerprint)
    return cached


# Placeholder for a content holding a special-token string while its place in the rendered text is found.
_MARK = "\ue000posttrain-content-{}\ue001"
_MARK_RE = re.compile("\ue000posttrain-content-(\\d+)\ue001")

Span = tuple[int, int, int]  # (message index, start, end): where a message's content sits in the rendered text


def _literal_contents(tokenizer, messages, text: str, specials: _Specials, *, add_generation_prompt: bool,
                      chat_template) -> list[Span]:
    """Where each content that holds a special-token string sits in ``text`` (none: ``[]``, the common case).

    The template renders the conversation once more with a placeholder in place of each such content; ``text`` must
    then read as that rendering with each placeholder replaced by its content (verbatim or stripped of surrounding
    whitespace, as ``| trim`` does). A template that changes such a content otherwise raises ``RenderError``: its
    special-token strings could not be kept as text.
    """
    suspect = {i for i, m in enumerate(messages) if isinstance(m.get("content"), str) and specials.find(m["content"])}
    if not suspect:
        return []
    marked = [dict(m, content=_MARK.format(i)) if i in suspect else m for i, m in enumerate(messages)]
    parts = _MARK_RE.split(_render_text(tokenizer, marked, add_generation_prompt=add_generation_prompt,
                                        chat_template=chat_template))  # [text, index, text, index, ..., text]
    spans: list[Span] = []
    position = 0
    for k in range(0, len(parts) - 1, 2):
        literal, index, following = parts[k], int(parts[k + 1]), parts[k + 2]
        located = None
        if index in suspect and text.startswith(literal, position):
            position += len(literal)
            content = messages[index]["content"]
            for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                if text.startswith(candidate, position) and text.startswith(following, position + len(candidate)):
                    located = (index, position, position + len(candidate))
                    break
        if located is None:
            break
        spans.append(located)
        position = located[2]
    else:
        if text[position:] == parts[-1]:
            return spans
    first = min(suspect)
    token = specials.find(messages[first]["content"]).group()
    raise RenderError(
        f"{template_name(tokenizer, chat_template)} changes message contents in a way posttrain cannot follow, so the "
        f"special-token string {token!r} in message {first} cannot be kept as text; remove it from the data"
    )


def _encode(tokenizer, text: str, literal: list[Span], specials: _Specials) -> tuple[list[int], list[tuple]]:
    """``(input_ids, offsets)`` of ``text``: one tokenization as ``apply_chat_template`` does, except that special
    tokens inside the ``literal`` spans (message contents) are tokenized as ordinary text.

    Then the text is cut at the template's own special tokens and each stretch between them is tokenized as
    ``split_special_tokens=True`` does (``_Specials.as_text``). The tokenizer must give the same ids when cut there
    (checked: a SentencePiece-style prefix space, or a special token that strips the whitespace beside it, would
    not), and must not make a special token from plain text (checked); otherwise ``RenderError``.
    """
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except TypeError as err:  # the Rust tokenizer rejects str with lone surrogates with a TypeError
        if UNPAIRED_SURROGATE.search(text):
            raise RenderError("the conversation holds an unpaired surrogate (e.g. a lone \\ud800 escape): not "
                              "valid Unicode text") from err
        raise
    input_ids = list(encoding["input_ids"])
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    if not literal:
        return input_ids, offsets
    special_ids = specials.ids

    def in_content(start: int, end: int) -> bool:
        return any(start < e and end > s for _, s, e in literal)

    cuts = [(t, start, end) for t, (start, end) in zip(input_ids, offsets)
            if t in special_ids and not in_content(start, end)]
    if len(cuts) == sum(t in special_ids for t in input_ids):  # no special token came from a content
        return input_ids, offsets
    ids, new_offsets, recognised = [], [], []
    as_text = specials.as_text(tokenizer)
    position = 0
    for token, start, end in cuts + [(None, len(text), len(text))]:
        if start > position:
            piece = text[position:start]
            encoded = as_text.encode(piece, add_special_tokens=False)
            ids += encoded.ids
            new_offsets += [(a + position, b + position) for a, b in encoded.offsets]
            recognised += tokenizer(piece, add_special_tokens=False)["input_ids"]  # as the one tokenization did
        if token is not None:
            ids.append(token)
            new_offsets.append((start, end))
            recognised.append(token)
        position = end
    name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
    if recognised != input_ids:
        raise RenderError(
            f"tokenizer {name!r} tokenizes the text differently when it is cut at its special tokens, so the "
            "special-token strings in message contents cannot be tokenized as text; remove them from the data"
        )
    forged = [tokenizer.convert_ids_to_tokens(t) for t, (s, e) in zip(ids, new_offsets)
              if t in special_ids and in_content(s, e)]
    if forged:
        raise RenderError(f"tokenizer {name!r} makes the special token {forged[0]!r} from plain text, so it cannot "
                          "be kept as text inside a message content; remove it from the data")
    return ids, new_offsets


def _reply_end(segment: str, content: str, specials: _Specials, content_end: int | None = None) -> int:
    """Characters of ``segment`` (a rendered reply plus what follows it) to train: content + end-of-turn.

    ``content_end``: where the content ends in ``segment`` when it is known (a content holding special-token strings,
    located exactly); otherwise the content is searched for."""
    if content_end is None:
        content_end = 0
        for candidate in (content, content.strip()):
            if candidate and (pos := segment.find(candidate)) >= 0:
                content_end = pos + len(candidate)
                break
    end_of_turn = specials.find(segment, content_end)
    if end_of_turn is None:  # no special end-of-turn token: the whole suffix the template writes closes the turn
        return len(segment)
    return end_of_turn.end()


def _trained_char_spans(tokenizer, messages, strategy, chat_template, full: str, specials: _Specials,
                        literal: list[Span]) -> list[tuple[int, int]]:
    assistant_turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if strategy == MultiTurnStrategy.final_turn_only:
        assistant_turns = assistant_turns[-1:]
    spans = []
    for i in assistant_turns:
        prefix = _render_text(tokenizer, messages[:i], add_generation_prompt=True, chat_template=chat_template)
        through = full if i + 1 == len(messages) else _render_text(  # the last turn: through it is the whole text
            tokenizer, messages[: i + 1], add_generation_prompt=False, chat_template=chat_template)
        if not (through.startswith(prefix) and full.startswith(through)):
            raise TemplateNotPrefixStableError(
                f"{template_name(tokenizer, chat_template)} is not prefix-stable: rendering the conversation up to "
                f"assistant turn {i} does not give a prefix of the full rendering, so the loss mask would be wrong. "
                "Use a prefix-stable template (e.g. --chat_template chatml) or --strategy final_turn_only."
            )
        located = [end for j, start, end in literal if j == i and len(prefix) <= start <= len(through)]
        content_end = located[0] - len(prefix) if located else None
        end = _reply_end(through[len(prefix):], str(messages[i].get("content", "")), specials, content_end)
        spans.append((len(prefix), len(prefix) + end))
    return spans


def _render(tokenizer, messages, strategy: MultiTurnStrategy, chat_template):
    """(input_ids, loss_mask, token character offsets, trained character spans) from one tokenization."""
    if not messages:
        raise ValueError("empty conversation")
    messages = with_reasoning_for(messages, chat_template or getattr(tokenizer, "chat_template", None))
    full = _render_text(tokenizer, messages, add_generation_prompt=False, chat_template=chat_template)
    specials = _specials(tokenizer)
    literal = _literal_contents(tokenizer, messages, full, specials, add_generation_prompt=False,
                                chat_template=chat_template)
    spans = _trained_char_spans(tokenizer, messages, strategy, chat_template, full, specials, literal)
    input_ids, offsets = _encode(tokenizer, full, literal, specials)
    loss_mask = [0] * len(input_ids)
    span_index = 0
    for t, (start, end) in enumerate(offsets):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        if end > span_start and start < span_end:  # token overlaps the trained span
            loss_mask[t] = 1
    return input_ids, loss_mask, offsets, (full, spans)


def render_conversation(
    tokenizer,
    messages: Sequence[Message],
    strategy: str = "all_assistant_turns",
    *,
    chat_template: str | None = None,
) -> tuple[list[int], list[int]]:
    """Render ``messages`` with the tokenizer's chat template into ``(input_ids, loss_mask)``.

    ``input_ids`` equal ``tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]`` when no content holds
    a special-token string (one that does is tokenized as text, see the module docstring); ``loss_mask`` is 1 on the
    assistant contents and the end-of-turn token closing each trained turn, 0 on system/user/tool turns and
    template scaffolding. ``strategy``: ``all_assistant_turns`` or ``final_turn_only``.
    Raises ``TemplateNotPrefixStableError`` when the template rewrites earlier turns as the conversation grows.
    The harmony template is rendered by ``posttrain.data.harmony`` (its own mask rules, docs/rendering.md).
    """
    if uses_harmony(tokenizer, chat_template):
        ids, mask, _, _, _ = _harmony_call(harmony.render_harmony, tokenizer, messages, MultiTurnStrategy(strategy))
        return ids, mask
    input_ids, loss_mask, _, _ = _render(tokenizer, messages, MultiTurnStrategy(strategy), chat_template)
    return input_ids, loss_mask


def render_with_offsets(tokenizer, messages: Sequence[Message], *, chat_template: str | None = None):
    """``(input_ids, loss_mask, offsets, reply_start)`` for a conversation ending in an assistant turn: the token
    character offsets into the rendered text and where the final reply's characters start (for process RMs, which
    need the token that ends each step of the reply)."""
    if uses_harmony(tokenizer, chat_template):
        ids, mask, offsets, _, spans = _harmony_call(harmony.render_harmony, tokenizer, messages, "final_turn_only")
        return ids, mask, offsets, spans[-1][1]  # the last message's content (its final answer)
    ids, mask, offsets, (full, spans) = _render(tokenizer, messages, MultiTurnStrategy.final_turn_only, chat_template)
    reply_start = spans[-1][0] + max(0, full[spans[-1][0]:].find(str(messages[-1].get("content", ""))))
    return ids, mask, offsets, reply_start


def render_prompt(tokenizer, messages: Sequence[Message], *, chat_template: str | None = None) -> list[int]:
    """Token ids of ``messages`` followed by the template's generation prompt (what the model continues from).

    Equals the prompt part of ``render_conversation`` for the same conversation plus a reply (tested).
    """
    if uses_harmony(tokenizer, chat_template):
        return _harmony_call(harmony.render_harmony_prompt, tokenizer, messages)
    messages = with_reasoning_for(messages, chat_template or getattr(tokenizer, "chat_template", None))
    text = _render_text(tokenizer, messages, add_generation_prompt=True, chat_template=chat_template)
    specials = _specials(tokenizer)
    literal = _literal_contents(tokenizer, messages, text, specials, add_generation_prompt=True,
                                chat_template=chat_template)
    return _encode(tokenizer, text, literal, specials)[0]


def end_of_turn_token_ids(tokenizer, *, chat_template: str | None = None) -> list[int]:
    """Token ids that end an assistant turn under this template (plus eos): the stop tokens for generation.
    Harmony: ``<|return|>`` and ``<|call|>`` (``<|end|>`` closes a message, not the reply)."""
    if uses_harmony(tokenizer, chat_template):
        eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
        return sorted(set(harmony.stop_token_ids(tokenizer) + eos))
    probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        input_ids, mask = render_conversation(tokenizer, probe, chat_template=chat_template)
    except (RenderError, TemplateNotPrefixStableError):
        return sorted(ids)
    special_ids = set(tokenizer.all_special_ids)
    trained = [tok for tok, m in zip(input_ids, mask) if m]
    if trained and trained[-1] in special_ids:
        ids.add(int(trained[-1]))
    return sorted(ids)

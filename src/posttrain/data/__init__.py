"""The data layer: loading and validating rows, the one rendering path, padding-free packing.

Public API::

    render_conversation(tokenizer, messages, strategy="all_assistant_turns") -> (input_ids, loss_mask)
    render_prompt(tokenizer, messages) -> input_ids
    parse_harmony(text) -> {"analysis": str, "final": str | None, "tool_calls": [...]}   (a generated harmony reply)
"""

from posttrain.data.examples import load_sft_examples, load_texts
from posttrain.data.harmony import answer_text, parse_harmony
from posttrain.data.io import DataError, LoadReport, Row, read_rows
from posttrain.data.packing import (
    Example,
    collate_flat,
    collate_packed,
    collate_padded,
    first_fit_decreasing,
    pack_batch,
)
from posttrain.data.render import (
    MultiTurnStrategy,
    RenderError,
    TemplateNotPrefixStableError,
    end_of_turn_token_ids,
    render_conversation,
    render_prompt,
)
from posttrain.data.templates import CHAT_TEMPLATES, get_chat_template, set_chat_template

__all__ = [
    "CHAT_TEMPLATES",
    "DataError",
    "Example",
    "LoadReport",
    "MultiTurnStrategy",
    "RenderError",
    "Row",
    "TemplateNotPrefixStableError",
    "answer_text",
    "collate_flat",
    "collate_packed",
    "collate_padded",
    "end_of_turn_token_ids",
    "first_fit_decreasing",
    "get_chat_template",
    "load_sft_examples",
    "load_texts",
    "pack_batch",
    "parse_harmony",
    "read_rows",
    "render_conversation",
    "render_prompt",
    "set_chat_template",
]

"""From files to training examples: read -> validate -> render -> fit length, with one report of what was dropped."""

from __future__ import annotations

from pathlib import Path

from posttrain.data.io import (
    DataError,
    LoadReport,
    Row,
    check_text,
    read_rows,
    sft_messages,
    template_requires_alternation,
    validate_rows,
)
from posttrain.data.packing import Example, fit_length
from posttrain.data.render import RenderError, TemplateNotPrefixStableError, render_conversation


def load_sft_examples(
    path: str | Path,
    tokenizer,
    *,
    strategy: str = "all_assistant_turns",
    max_length: int = 1024,
    truncation: str = "drop",
    skip_invalid: bool = False,
    columns: dict[str, str] | None = None,
) -> tuple[list[Example], LoadReport]:
    """SFT conversations (``messages`` or ``prompt``/``completion``) rendered to examples.

    A template that rejects a row (e.g. roles must alternate) is reported like any other bad row; a template that is
    not prefix-stable raises at once (it is wrong for every row, not for one).
    """
    rows = read_rows(path, columns=columns)
    alternation = template_requires_alternation(getattr(tokenizer, "chat_template", None))

    def render(row: Row) -> Example:
        messages = sft_messages(row, require_alternation=alternation)
        try:
            input_ids, loss_mask = render_conversation(tokenizer, messages, strategy)
        except RenderError as err:
            raise row.error("messages", str(err)) from None
        if not any(loss_mask[1:]):
            raise row.error("messages", "no trained token after rendering")
        return Example(input_ids, loss_mask)

    try:
        kept, report = validate_rows(rows, render, skip_invalid=skip_invalid, source=str(path))
    except TemplateNotPrefixStableError:
        raise
    examples = []
    for row, example in kept:
        fitted = fit_length(example, max_length, truncation)
        if fitted is None:
            report.drop(f"longer than max_length={max_length}")
            continue
        examples.append(fitted)
    report.kept = len(examples)
    if not examples:
        raise DataError(str(path), "", None, f"no usable rows ({report.summary()})")
    return examples, report


def load_texts(
    path: str | Path, *, skip_invalid: bool = False, columns: dict[str, str] | None = None
) -> tuple[list[str], LoadReport]:
    """Plain-text rows (``text`` column) for pretraining."""
    rows = read_rows(path, columns=columns)
    kept, report = validate_rows(rows, lambda row: check_text(row, "text"), skip_invalid=skip_invalid, source=str(path))
    if not kept:
        raise DataError(str(path), "", None, f"no usable rows ({report.summary()})")
    return [text for _, text in kept], report

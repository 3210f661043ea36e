"""Built-in chat templates: the formats of the RLHF book's instruction-tuning chapter.

Each template is a Jinja string for ``tokenizer.apply_chat_template`` (Hugging Face renders with
``trim_blocks`` and ``lstrip_blocks``). They are written on one line so that no stray whitespace leaks in.

chatml (OpenAI ChatML)::

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n

zephyr (HuggingFaceH4 Zephyr; ``</s>`` is the tokenizer's eos token)::

    <|system|>\\n{content}</s>\\n<|user|>\\n{content}</s>\\n<|assistant|>\\n{content}</s>\\n

tulu (AllenAI Tulu; eos closes assistant turns only, no newline after the last one)::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}</s>\\n<|user|>\\n...

Other roles (e.g. ``tool``) are rendered like ``user`` with their own role name.

harmony (OpenAI's harmony format, channels and tool calls; docs/rendering.md "Harmony")::

    <|start|>user<|message|>{content}<|end|><|start|>assistant<|channel|>final<|message|>{content}<|return|>

is not a Jinja template: it drops the reasoning of earlier turns, so posttrain renders it directly from pieces
(``posttrain.data.harmony``). ``HARMONY`` is the marker set as the tokenizer's ``chat_template`` (it survives
``save_pretrained``): ``render_conversation`` / ``render_prompt`` recognise it, and Jinja rendering of it raises.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TULU = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)

HARMONY = (
    "{#- posttrain:harmony -#}"
    "{{ raise_exception('the harmony format is rendered by posttrain.data.harmony (render_conversation, "
    "render_prompt), not by Jinja') }}"
)

HARMONY_TOKENS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|constrain|>"]
"""The special tokens of the harmony format (openai-harmony's o200k_harmony names them the same)."""

CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML, "zephyr": ZEPHYR, "tulu": TULU, "harmony": HARMONY}

# Special tokens each built-in template writes, so a tokenizer given the template keeps them whole.
TEMPLATE_SPECIAL_TOKENS: dict[str, list[str]] = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "zephyr": [],
    "tulu": [],
    "harmony": HARMONY_TOKENS,
}


def get_chat_template(name_or_template: str) -> str:
    """A built-in template by name (``chatml``, ``zephyr``, ``tulu``, ``harmony``), or the Jinja string itself."""
    if name_or_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_template]
    if "{" in name_or_template:  # a literal Jinja template
        return name_or_template
    raise ValueError(
        f"unknown chat template {name_or_template!r}: use one of {sorted(CHAT_TEMPLATES)} or a Jinja string"
    )


def set_chat_template(tokenizer, name_or_template: str, *, add_special_tokens: bool = True):
    """Set a built-in (or literal Jinja) chat template on ``tokenizer`` in place and return it.

    For ``chatml`` the ``<|im_start|>``/``<|im_end|>`` markers, for ``harmony`` its seven tokens (``HARMONY_TOKENS``)
    are registered as special tokens when missing (``add_special_tokens=True``) so they are never split; a model
    trained with them then needs ``resize_token_embeddings`` if the vocabulary grew.
    """
    template = get_chat_template(name_or_template)
    missing = [t for t in TEMPLATE_SPECIAL_TOKENS.get(name_or_template, []) if t not in tokenizer.get_vocab()]
    if add_special_tokens and missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.chat_template = template
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

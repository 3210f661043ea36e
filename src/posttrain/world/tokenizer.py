"""The tiny world's tokenizer: byte-level BPE trained offline with `tokenizers`, saved as a Hugging Face
``PreTrainedTokenizerFast`` directory with pad/eos tokens and a ChatML-style Jinja chat template.

Digits are split one per token (the usual choice for arithmetic: every number is spelled the same way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

EOS = "<|im_end|>"  # ends an assistant turn: the stop token
BOS_DOC = "<|endoftext|>"  # separates pretraining documents
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS_DOC, "<|im_start|>", EOS, PAD]

# ChatML with {% generation %} markers around what is trained (content + <|im_end|>), so HF's
# return_assistant_tokens_mask and TRL's assistant_only_loss also work, and with the roles checked: user and
# assistant turns must alternate, and a system turn may only come first.
WORLD_CHAT_TEMPLATE = (
    "{%- set ns = namespace(previous='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{%- elif message['role'] == 'system' and not loop.first -%}"
    "{{ raise_exception('A system message may only come first') }}"
    "{%- elif message['role'] in ['user', 'assistant'] and message['role'] == ns.previous -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- if message['role'] != 'system' -%}{%- set ns.previous = message['role'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024):
    """Train the BPE on ``texts`` and save a ``PreTrainedTokenizerFast`` to ``out_dir``; returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        model_max_length=1024,
    )
    tokenizer.chat_template = WORLD_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer

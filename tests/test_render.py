"""Property tests of the one rendering path, for every built-in template and the tiny world's own template."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.data import (
    TemplateNotPrefixStableError,
    end_of_turn_token_ids,
    render_conversation,
    render_prompt,
    set_chat_template,
)

TEMPLATES = ["world", "chatml", "zephyr", "tulu"]

# Contents: words, digits, punctuation, inner newlines. A content may not *start* with a newline: the template's
# own "\n" before it would merge with it into one BPE token, and no mask can then split template from content.
_alphabet = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 .,?!'+-*=:()\n"))
content = st.text(_alphabet, min_size=1, max_size=40).filter(lambda s: s.strip() and s[0] != "\n")


@st.composite
def conversations(draw, allow_tool: bool = True):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(content)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(content)})
        messages.append({"role": "assistant", "content": draw(content)})
        if allow_tool and draw(st.integers(0, 4)) == 0:  # a tool result, answered by the assistant
            messages.append({"role": "tool", "content": draw(content)})
            messages.append({"role": "assistant", "content": draw(content)})
    return messages


@pytest.fixture(scope="module")
def tokenizers(world_tokenizer):
    result = {"world": world_tokenizer}
    for name in ["chatml", "zephyr", "tulu"]:
        result[name] = set_chat_template(copy.deepcopy(world_tokenizer), name)
    return result


def end_of_turn_text(name: str, tokenizer) -> str:
    """What closes an assistant turn, written out per template (the RLHF book's formats)."""
    return "<|im_end|>" if name in ("world", "chatml") else tokenizer.eos_token


def trained_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)


PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name", TEMPLATES)
@PROPERTY_SETTINGS
@given(messages=conversations())
def test_all_assistant_turns(tokenizers, name, messages):
    tokenizer = tokenizers[name]
    ids, mask = render_conversation(tokenizer, messages, "all_assistant_turns")
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    eot = end_of_turn_text(name, tokenizer)
    expected = "".join(m["content"] + eot for m in messages if m["role"] == "assistant")
    assert trained_text(tokenizer, ids, mask) == expected


@pytest.mark.parametrize("name", TEMPLATES)
@PROPERTY_SETTINGS
@given(messages=conversations())
def test_final_turn_only(tokenizers, name, messages):
    tokenizer = tokenizers[name]
    ids, mask = render_conversation(tokenizer, messages, "final_turn_only")
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert trained_text(tokenizer, ids, mask) == messages[-1]["content"] + end_of_turn_text(name, tokenizer)
    # Everything before the last reply's generation prompt is untrained.
    prompt = render_prompt(tokenizer, messages[:-1])
    assert not any(mask[: len(prompt)])


@pytest.mark.parametrize("name", TEMPLATES)
@PROPERTY_SETTINGS
@given(messages=conversations())
def test_generation_prompt_is_training_prefix(tokenizers, name, messages):
    """No train/inference mismatch: the prompt rendered for generation is exactly the tokens the model saw before
    each trained reply, and the first trained token comes right after it."""
    tokenizer = tokenizers[name]
    ids, mask = render_conversation(tokenizer, messages)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_prompt(tokenizer, messages[:i])
        assert ids[: len(prompt)] == prompt
        assert mask[len(prompt)] == 1 and (len(prompt) == 0 or mask[len(prompt) - 1] == 0)


@PROPERTY_SETTINGS
@given(messages=conversations())
def test_world_mask_equals_hf_generation_mask(tokenizers, messages):
    """The world template marks trained text with {% generation %}: HF's own assistant mask must agree."""
    tokenizer = tokenizers["world"]
    ids, mask = render_conversation(tokenizer, messages)
    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True)
    assert reference["assistant_masks"] == mask


def test_end_of_turn_token_is_trained(tokenizers):
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is 4."}]
    for name, tokenizer in tokenizers.items():
        ids, mask = render_conversation(tokenizer, messages)
        stop_ids = set(end_of_turn_token_ids(tokenizer))
        trained = [t for t, m in zip(ids, mask) if m]
        assert trained[-1] in stop_ids, name  # a model that never trains on it never learns to stop
        assert sum(mask) == len(tokenizer("The answer is 4.", add_special_tokens=False)["input_ids"]) + 1


def test_hand_checked_chatml_mask(tokenizers):
    """Token by token for one conversation: system and user turns and the role headers are masked out."""
    tokenizer = tokenizers["chatml"]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    ids, mask = render_conversation(tokenizer, messages)
    pieces = [(tokenizer.decode([t]), m) for t, m in zip(ids, mask)]
    trained = [p for p, m in pieces if m]
    assert "".join(trained) == "Hello<|im_end|>"
    assert pieces[-1] == ("\n", 0)  # the newline after <|im_end|> is template, not trained
    assert all(m == 0 for p, m in pieces if p in ("<|im_start|>", "system", "user", "assistant"))


NOT_PREFIX_STABLE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n[earlier reply]<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_not_prefix_stable_template_raises(world_tokenizer):
    """A template that rewrites earlier assistant turns (as reasoning-stripping templates do) cannot be masked
    per turn: rendering must refuse, naming the template, instead of silently mis-masking."""
    tokenizer = copy.deepcopy(world_tokenizer)
    tokenizer.chat_template = NOT_PREFIX_STABLE
    messages = [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(TemplateNotPrefixStableError, match="not prefix-stable") as err:
        render_conversation(tokenizer, messages, "all_assistant_turns")
    assert "chat template" in str(err.value)
    # Training only the final turn needs no earlier turn to be stable, so it is allowed.
    ids, mask = render_conversation(tokenizer, messages, "final_turn_only")
    assert trained_text(tokenizer, ids, mask) == "d<|im_end|>"


def test_set_chat_template_adds_chatml_tokens(world_tokenizer):
    from transformers import AutoTokenizer

    from posttrain.world.tokenizer import train_tokenizer

    plain = train_tokenizer(["hello world 1 2 3"] * 20, "/tmp/posttrain-plain-tok", vocab_size=300)
    plain = AutoTokenizer.from_pretrained("/tmp/posttrain-plain-tok")
    plain.chat_template = None
    set_chat_template(plain, "chatml")
    ids, mask = render_conversation(plain, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert plain.convert_tokens_to_ids("<|im_end|>") in ids


def test_unknown_strategy_and_empty(world_tokenizer):
    with pytest.raises(ValueError):
        render_conversation(world_tokenizer, [{"role": "user", "content": "a"}], "every_other_turn")
    with pytest.raises(ValueError, match="empty"):
        render_conversation(world_tokenizer, [])

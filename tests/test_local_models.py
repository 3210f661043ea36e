"""`--model` takes any local Hugging Face causal-LM directory, including one whose tokenizer has no chat template
and no pad token: the built-in template is set, its markers are added as special tokens and the embeddings grow."""

from __future__ import annotations

import json

import torch

from posttrain.cli import main


def _plain_qwen2(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["</s>"], show_progress=False)
    bpe.train_from_iterator(["What is 2 + 3? The answer is 5."] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    assert tokenizer.chat_template is None and tokenizer.pad_token is None
    tokenizer.save_pretrained(directory)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return len(tokenizer)


def test_sft_on_a_plain_local_qwen2_with_builtin_template(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "qwen2"
    vocab = _plain_qwen2(model_dir)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 3?"},
                          {"role": "assistant", "content": f"The answer is {i + 3}."}]} for i in range(8)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["sft", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--chat_template=zephyr",
                 "--max_steps=2", "--batch_size=4", "--progress=false", "--device=cpu"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert "<|assistant|>" in tokenizer.chat_template  # the template travels with the saved model
    assert tokenizer.pad_token is not None  # (transformers' Qwen2 tokenizer class brings its own default pad)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) >= vocab
    out_chatml = tmp_path / "run-chatml"
    assert main(["sft", "--model", str(model_dir), "--data", str(data), "--out", str(out_chatml),
                 "--chat_template=chatml", "--max_steps=1", "--batch_size=4", "--progress=false", "--device=cpu"]) == 0
    chatml = AutoTokenizer.from_pretrained(out_chatml / "model")
    grown = AutoModelForCausalLM.from_pretrained(out_chatml / "model").get_input_embeddings().weight.shape[0]
    assert chatml.convert_tokens_to_ids("<|im_end|>") >= vocab and grown == len(chatml) >= vocab + 2


def test_compile_keeps_the_parameter_names(tiny_model_dir):
    """--compile compiles each decoder layer in place (nn.Module.compile): the state dict, hence checkpoints and
    save_pretrained, keep their names; only the layers' forwards change (speed: benchmarks/RESULTS.md)."""
    from posttrain.models import load_causal_lm, prepare_for_training

    plain, compiled = load_causal_lm(tiny_model_dir), load_causal_lm(tiny_model_dir)
    prepare_for_training(compiled, segment_attention=False, compile=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    assert plain.model.layers[0]._compiled_call_impl is None

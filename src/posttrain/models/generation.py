"""The generation engine: N sampled completions per chat prompt, with the same rendering path as training.

One interface, two backends:

* :class:`HFEngine` — transformers' ``model.generate`` with a KV cache, on CPU or GPU. Prompts are rendered with
  ``render_prompt`` (the prompt part of exactly what training renders), left-padded, longest first so a batch pads
  little, and expanded to ``n`` rows each. Stops at the template's end-of-turn token
  or EOS.
* :class:`VLLMEngine` — vLLM, imported only when it is built. It receives the same rendered token ids (never the
  raw text), so both backends see identical prompts.

``load_engine(path, backend="auto")`` picks vLLM when it is installed and a GPU is present, else the built-in one.
A :class:`Completion` holds the exact sampled token ids, the end-of-turn / EOS token included, and a finish reason.
The built-in engine draws from a local ``torch.Generator``: sampling never reseeds or advances the global RNG.
Per-token log-probs (``SamplingParams.logprobs``) are those of the unprocessed model distribution (raw logits, before
temperature / top-p / top-k / min-p), which is what RL needs for importance ratios and KL terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.data.render import end_of_turn_token_ids, render_prompt


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None  # same seed + same inputs -> same completions
    logprobs: bool = False  # per-token log-probs of the sampled tokens

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be >= 1, got n={self.n}, max_new_tokens={self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p < 1:
            raise ValueError(f"invalid sampling parameters: temperature={self.temperature} (>= 0), top_p={self.top_p} "
                             f"(in (0, 1]), top_k={self.top_k} (>= 0), min_p={self.min_p} (in [0, 1))")


@dataclass
class Completion:
    """One sampled completion, exactly as sampled: what RL trains on and what the KL and the importance ratios use.

    ``token_ids`` are the sampled tokens, the end-of-turn / EOS token that ended them included (when
    ``finish_reason == "stop"``); ``logprobs`` has one entry per ``token_ids`` (the stop token's included), from the
    raw model distribution. ``text`` is the reply without the stop token; ``content_ids`` the tokens it decodes from.
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-turn/EOS emitted, last of token_ids) or "length" (budget used up)
    logprobs: list[float] | None = field(default=None)  # log pi(token | context) per token_ids (when asked for)

    @property
    def content_ids(self) -> list[int]:
        return self.token_ids[:-1] if self.finish_reason == "stop" else self.token_ids


class _SampleFromGenerator:
    """A logits processor that samples the next token from a local ``torch.Generator`` and returns scores that are
    -inf everywhere but the drawn token, so transformers' greedy decoding (with its KV cache, padding and stopping)
    emits exactly that token. transformers' own sampling draws from the global RNG; this never touches it.

    The distribution is that of transformers' sampling: the raw logits through temperature, top-k, top-p and min-p
    (its own warpers, in its order), then softmax."""

    def __init__(self, params: "SamplingParams", generator: torch.Generator):
        from transformers.generation.logits_process import (
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.generator = generator
        self.warpers = []
        if params.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            self.warpers.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=params.top_p))
        if params.min_p:
            self.warpers.append(MinPLogitsWarper(min_p=params.min_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)  # (rows, V)
        drawn = torch.multinomial(probs, num_samples=1, generator=self.generator)  # (rows, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)


class HFEngine:
    """Batched sampling with transformers' ``generate`` (KV cache). ``batch_size`` counts sequences (prompts x n)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_path(cls, path: str | Path, *, device: str = "auto", chat_template: str = "", **kwargs) -> "HFEngine":
        from posttrain.models.loading import load_causal_lm, load_tokenizer, resolve_device

        tokenizer = load_tokenizer(path, chat_template or None)
        return cls(load_causal_lm(path, device=resolve_device(device)).eval(), tokenizer, **kwargs)

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions for each prompt (a list of chat messages), in the caller's order.

        Draws come from one local ``torch.Generator`` seeded with ``params.seed`` (a fresh random seed when None):
        the global RNG is neither reseeded nor advanced, so a training loop that samples keeps its own stream.
        """
        from transformers import GenerationConfig, LogitsProcessorList

        tokenizer, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        stop_ids = end_of_turn_token_ids(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        sample = params.temperature > 0
        copies = 1 if sample else params.n  # greedy: decode once, the n completions are identical
        per_prompt = params.n // copies  # rows decoded per prompt
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                  pad_token_id=pad_id, return_dict_in_generate=True, output_logits=params.logprobs)
        processors = None
        if sample:
            generator = torch.Generator(device=device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
            processors = LogitsProcessorList([_SampleFromGenerator(params, generator)])
        was_training = model.training
        model.eval()
        encoded = [render_prompt(tokenizer, messages) for messages in prompts]
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))  # longest first: little padding
        prompts_per_batch = max(1, self.batch_size // params.n)
        results: list[list[Completion]] = [[] for _ in encoded]
        for start in range(0, len(order), prompts_per_batch):
            chunk = order[start : start + prompts_per_batch]
            width = max(len(encoded[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding: generation continues right after each prompt
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention_mask[row, width - len(encoded[i]) :] = 1
            output = model.generate(input_ids=input_ids.repeat_interleave(per_prompt, 0).to(device),
                                    attention_mask=attention_mask.repeat_interleave(per_prompt, 0).to(device),
                                    generation_config=config, logits_processor=processors)
            new_tokens = output.sequences[:, width:].tolist()  # (len(chunk) * per_prompt, T), a prompt's rows adjacent
            token_logprobs = None
            if params.logprobs:  # raw logits (T tensors of (rows, V)) -> log-prob of each sampled token
                logits = torch.stack(output.logits, dim=1).float()  # (rows, T, V)
                sampled = output.sequences[:, width:, None]
                token_logprobs = logits.log_softmax(-1).gather(-1, sampled)[..., 0].tolist()
            for row, tokens in enumerate(new_tokens):
                stop = next((k for k, tok in enumerate(tokens) if tok in stop_ids), None)
                ids = tokens[: stop + 1] if stop is not None else tokens  # the stop token is part of the sample
                completion = Completion(
                    text=tokenizer.decode(ids[:stop] if stop is not None else ids, skip_special_tokens=True),
                    token_ids=ids, finish_reason="stop" if stop is not None else "length",
                    logprobs=token_logprobs[row][: len(ids)] if token_logprobs is not None else None)
                results[chunk[row // per_prompt]].extend([completion] * copies)
        model.train(was_training)
        return results


class VLLMEngine:
    """vLLM backend (GPU). Takes posttrain-rendered prompt token ids, so prompts match the built-in engine's."""

    def __init__(self, path: str | Path, *, chat_template: str = "", **llm_kwargs):
        from vllm import LLM  # optional dependency: only imported here

        from posttrain.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(path, chat_template or None)
        self.llm = LLM(model=str(path), **llm_kwargs)

    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        stop_ids = end_of_turn_token_ids(self.tokenizer)
        vllm_params = VLLMSamplingParams(
            n=params.n, max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, min_p=params.min_p, seed=params.seed,
            stop_token_ids=stop_ids, logprobs=0 if params.logprobs else None)
        requests = [TokensPrompt(prompt_token_ids=render_prompt(self.tokenizer, messages)) for messages in prompts]
        results = []
        for request in self.llm.generate(requests, vllm_params, use_tqdm=False):
            samples = []
            for out in request.outputs:
                ids = list(out.token_ids)  # vLLM keeps the stop token among the outputs of a stop_token_ids stop
                logprobs = None
                if params.logprobs and out.logprobs is not None:
                    logprobs = [step[t].logprob for t, step in zip(ids, out.logprobs)]
                text_ids = ids[:-1] if ids and ids[-1] in stop_ids else ids
                samples.append(Completion(self.tokenizer.decode(text_ids, skip_special_tokens=True), ids,
                                          "stop" if out.finish_reason == "stop" else "length", logprobs))
            results.append(samples)
        return results


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def load_engine(path: str | Path, *, backend: str = "auto", device: str = "auto", chat_template: str = "",
                batch_size: int = 64):
    """``backend``: "hf" (built-in), "vllm", or "auto" (vLLM when installed and a GPU is present)."""
    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"unknown backend {backend!r}: use auto, hf or vllm")
    if backend == "vllm" or (backend == "auto" and device != "cpu" and vllm_available()):
        return VLLMEngine(path, chat_template=chat_template)
    return HFEngine.from_path(path, device=device, chat_template=chat_template, batch_size=batch_size)


def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 32, seed: int | None = None) -> list[Completion]:
    """One completion per prompt (greedy by default) with the built-in engine."""
    params = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return [samples[0] for samples in HFEngine(model, tokenizer, batch_size=batch_size).generate(prompts, params)]

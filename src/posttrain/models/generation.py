"""The generation engine: N sampled completions per chat prompt, with the same rendering path as training.

One interface, two backends:

* :class:`HFEngine` — a transformers model with its KV cache, on CPU or GPU. Prompts are rendered with
  ``render_prompt`` (the prompt part of exactly what training renders), left-padded, longest first so a batch pads
  little, prefilled once and expanded to ``n`` rows each; a row leaves the batch when it stops (at the template's
  end-of-turn token or EOS).
* :class:`VLLMEngine` — vLLM, imported only when it is built. It receives the same rendered token ids (never the
  raw text), so both backends see identical prompts.

``load_engine(path, backend="auto")`` picks vLLM when it is installed and a GPU is present, else the built-in one.
A :class:`Completion` holds the exact sampled token ids, the end-of-turn / EOS token included, and a finish reason.
The built-in engine draws from a local ``torch.Generator``: sampling never reseeds or advances the global RNG.
Per-token log-probs (``SamplingParams.logprobs``) are those of the unprocessed model distribution (raw logits, before
temperature / top-p / top-k / min-p), or with ``scaled_logprobs`` those of logits / temperature: the distribution RL
trains when it samples at T != 1 (top-p / top-k truncation is not part of it, as in TRL and verl), which
``posttrain.models.logprobs.token_logps(..., temperature=T)`` recomputes.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
    scaled_logprobs: bool = False  # log-probs of logits / temperature (what RL trainers score), not of raw logits

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


def inverse_cdf_draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs (rows, V), not necessarily normalised; uniform (rows,) in [0, 1) -> one token id per row (rows,):
    the first token whose cumulative probability exceeds ``uniform * total``, so token i is drawn with probability
    probs[i] / total, as ``torch.multinomial(probs, 1)`` draws it.

    One uniform per row instead of the V exponentials torch.multinomial draws on a CPU (its cost: ~1 ms per decoding
    step of 64 rows over a 1024-token vocabulary, 8 % of the tiny model's step, against 0.1 ms here). The cumulative
    sum is in float64, so a token's share of [0, total) is its probability to ~1e-16 even over a 150k vocabulary; a
    token of probability 0 (cut by top-k / top-p / min-p) spans nothing and is never drawn, not even when
    ``uniform * total`` reaches the total (the target is kept below it); exactly so on a CPU, to the last bit of a
    GPU's parallel scan elsewhere."""
    if probs.device.type == "mps":  # no float64 there
        return inverse_cdf_draw(probs.cpu(), uniform.cpu()).to(probs.device)
    cdf = probs.double().cumsum(-1)  # (rows, V)
    if cdf.device.type != "cpu":  # a parallel scan need not be monotone in its last bit; searchsorted needs it sorted
        cdf = cdf.cummax(-1).values
    total = cdf[:, -1:]
    target = torch.minimum(uniform.double()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


class _Sampler:
    """The next token of every live row: argmax (greedy), or a draw from a local ``torch.Generator`` after
    transformers' own warpers (temperature, top-k, top-p, min-p, in its order), then softmax — the distribution of
    transformers' sampling (drawn by inverse CDF, :func:`inverse_cdf_draw`), without touching the global RNG."""

    def __init__(self, params: "SamplingParams", device: torch.device):
        from transformers.generation.logits_process import (
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.greedy = params.temperature == 0
        self.generator = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        self.warpers = []
        if not self.greedy and params.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            self.warpers.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=params.top_p))
        if params.min_p:
            self.warpers.append(MinPLogitsWarper(min_p=params.min_p))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (rows, V) -> token ids (rows,)"""
        # NaN or +inf logits (a diverged or damaged model; -inf is a legitimate mask) would make argmax return
        # garbage silently and torch.multinomial fail with a bare "probability tensor contains nan"
        if bool(torch.isnan(logits).any() | torch.isposinf(logits).any()):
            from posttrain.plumbing.harness import NonFiniteError

            raise NonFiniteError("the model's next-token logits are not finite (NaN or +Inf): its weights have "
                                 "diverged or are damaged, so it cannot generate")
        if self.greedy:
            return logits.argmax(dim=-1)
        scores = logits.float()
        no_ids = torch.empty((scores.shape[0], 0), dtype=torch.long, device=scores.device)  # the warpers ignore it
        for warp in self.warpers:
            scores = warp(no_ids, scores)
        if bool(torch.isneginf(scores).all(dim=-1).any()):
            raise ValueError("every next token of a row has a logit of -inf (masked by the model or a logits "
                             "processor): there is nothing to sample")
        uniform = torch.rand(scores.shape[0], generator=self.generator, device=scores.device,
                             dtype=torch.float32 if scores.device.type == "mps" else torch.float64)
        return inverse_cdf_draw(torch.softmax(scores, dim=-1), uniform)


def _forward_parameters(model) -> set[str]:
    """Keyword names of the model's own forward, through PEFT and torch.compile wrappers (whose forward takes
    ``**kwargs``) and instance-level patches."""
    inner = model
    for _ in range(4):
        if hasattr(inner, "get_base_model"):  # peft
            inner = inner.get_base_model()
        elif hasattr(inner, "_orig_mod"):  # torch.compile
            inner = inner._orig_mod
        else:
            break
    return set(inspect.signature(type(inner).forward).parameters)


# Cache layers whose rows transformers' batch_repeat_interleave / batch_select_indices copy and drop completely;
# linear-attention layers (Mamba, Qwen3-Next, LFM2, ...) hold conv / recurrent states those methods do not reindex.
_ROW_EDITABLE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer", "DynamicIndexedLayer", "DummyLayer")


def _rows_editable(cache) -> bool:
    """Whether the cache's batch rows can be copied and dropped in place (every layer a plain key/value layer)."""
    from transformers import cache_utils

    layers = getattr(cache, "layers", None)
    if not layers or not hasattr(cache, "batch_select_indices") or not hasattr(cache, "batch_repeat_interleave"):
        return False
    plain = tuple(getattr(cache_utils, name) for name in _ROW_EDITABLE_LAYERS if hasattr(cache_utils, name))
    linear = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
    return all(isinstance(layer, plain) and not (linear is not None and isinstance(layer, linear))
               for layer in layers)


def _preallocate(cache, extra: int) -> None:
    """Give every plain ``DynamicLayer`` of ``cache`` room for ``extra`` more tokens, in place.

    transformers' DynamicLayer appends each decoded token with ``torch.cat``, copying the whole cache every step
    (O(T^2) bytes; 30 % of a CPU decode of the tiny model, profiled). A layer with a buffer writes the new token into
    its slot and hands attention a view of the filled part. Other layer types (sliding window, indexed, quantized)
    keep their own update."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, layer, room: int):
            super().__init__()
            self.device, self.is_initialized, self.length = layer.device, True, layer.keys.shape[-2]
            batch, heads, _, dim = layer.keys.shape
            self.key_buffer = layer.keys.new_empty((batch, heads, self.length + room, dim))
            self.value_buffer = layer.values.new_empty((batch, heads, self.length + room, layer.values.shape[-1]))
            self.key_buffer[:, :, : self.length] = layer.keys
            self.value_buffer[:, :, : self.length] = layer.values
            self._views()

        def _views(self) -> None:
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self.key_buffer.shape[-2]:  # past the room asked for: double it
                self._resize(max(end, 2 * self.key_buffer.shape[-2]))
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def _resize(self, capacity: int) -> None:
            for name in ("key_buffer", "value_buffer"):
                old = getattr(self, name)
                new = old.new_empty((*old.shape[:2], capacity, old.shape[-1]))
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, new)

        def batch_select_indices(self, indices) -> None:  # copies the filled part only, as DynamicLayer does
            for name in ("key_buffer", "value_buffer"):
                old = getattr(self, name)
                new = old.new_empty((len(indices), *old.shape[1:]))
                torch.index_select(old[:, :, : self.length], 0, indices, out=new[:, :, : self.length])
                setattr(self, name, new)
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, 0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, 0)
            self._views()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a decoding cache of posttrain's engine is not cropped")

    layers = getattr(cache, "layers", None) or []
    for index, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            layers[index] = PreallocatedLayer(layer, extra)


class HFEngine:
    """Batched sampling with a transformers model and its KV cache. ``batch_size`` counts sequences (prompts x n).

    The decoding loop is ours, around the model's own forward and cache (so it serves any causal LM):
    each prompt is prefilled ONCE and its cache repeated for its ``n`` samples (``generate`` would prefill every
    copy), and a row that has stopped leaves the batch (``DynamicCache.batch_select_indices``) instead of being
    decoded to the batch's longest reply — on a CPU this makes sampling several times faster.
    """

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
    def generate(self, prompts: list[list[dict]], params: SamplingParams, *,
                 should_stop: Callable[[], bool] | None = None) -> list[list[Completion]]:
        """``params.n`` completions for each prompt (a list of chat messages), in the caller's order.

        Draws come from one local ``torch.Generator`` seeded with ``params.seed`` (a fresh random seed when None):
        the global RNG is neither reseeded nor advanced, so a training loop that samples keeps its own stream.
        ``should_stop`` (e.g. "the client has gone") is asked before each batch of prompts is prefilled and after
        each decoding step: when it returns True the rows end where they are, with finish_reason "length" (what was
        sampled so far is unchanged; the prompts not started get empty completions, and no prefill).
        """
        tokenizer, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        stop_ids = end_of_turn_token_ids(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        sampler = _Sampler(params, device)
        copies = params.n if sampler.greedy else 1  # greedy: decode once, the n completions are identical
        per_prompt = params.n // copies  # rows decoded per prompt
        was_training = model.training
        attention = getattr(model.config, "_attn_implementation", None)
        encoded = [render_prompt(tokenizer, messages) for messages in prompts]
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))  # longest first: little padding
        prompts_per_batch = max(1, self.batch_size // per_prompt)
        results: list[list[Completion]] = [[] for _ in encoded]
        try:
            if attention == "posttrain_segments":  # a model in training: its padding-free attention gets no padding
                model.config._attn_implementation = "sdpa"  # mask from transformers: decode left-padded rows with sdpa
            model.eval()
            for start in range(0, len(order), prompts_per_batch):
                chunk = order[start : start + prompts_per_batch]
                if should_stop is not None and should_stop():  # nobody waits for the rest: no prefill for them
                    for i in order[start:]:
                        results[i] = [Completion(text="", token_ids=[], finish_reason="length",
                                                 logprobs=[] if params.logprobs else None) for _ in range(params.n)]
                    break
                rows = self._decode([encoded[i] for i in chunk], per_prompt, params, sampler, stop_ids, pad_id, device,
                                    should_stop)
                for row, (ids, logprobs) in enumerate(rows):
                    stopped = bool(ids) and ids[-1] in stop_ids
                    completion = Completion(
                        text=tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True), token_ids=ids,
                        finish_reason="stop" if stopped else "length", logprobs=logprobs)
                    results[chunk[row // per_prompt]].extend([completion] * copies)
        finally:
            model.train(was_training)
            if attention == "posttrain_segments":
                model.config._attn_implementation = attention
        return results

    def _decode(self, prompt_ids: list[list[int]], per_prompt: int, params: SamplingParams, sampler: _Sampler,
                stop_ids: list[int], pad_id: int, device,
                should_stop: Callable[[], bool] | None = None) -> list[tuple[list[int], list[float] | None]]:
        """``per_prompt`` continuations of each prompt -> (token ids, the stop token included; raw log-probs or
        None) per row, prompt-major (row r continues prompt r // per_prompt)."""
        model = self.model
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, ids in enumerate(prompt_ids):  # left padding: every row's next token sits in the last column
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        accepted = _forward_parameters(model)
        cache_keyword = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.x
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}  # no (P, W, V) prefill logits

        def prefill():
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), use_cache=True, **last_only)
            cache = getattr(out, "cache", None)
            cache = getattr(out, "past_key_values", None) if cache is None else cache
            if cache is None:
                raise ValueError(f"{type(model).__name__} returned no KV cache; the built-in engine needs one "
                                 "(use --backend vllm for this model)")
            return cache, out.logits[:, -1, :].to(device)

        cache, logits = prefill()  # logits (P, V)
        editable = _rows_editable(cache)
        if per_prompt > 1:
            input_ids, mask, positions = (t.repeat_interleave(per_prompt, 0) for t in (input_ids, mask, positions))
            if editable:  # one prefill per prompt, its cache copied per sample
                cache.batch_repeat_interleave(per_prompt)
                logits = logits.repeat_interleave(per_prompt, 0)
            else:  # a cache whose rows cannot be copied (recurrent / conv states): prefill every copy
                cache, logits = prefill()
        if editable:
            _preallocate(cache, params.max_new_tokens)
        mask = mask.to(device)
        next_position = positions[:, -1:].to(device) + 1  # (R, 1)
        rows = mask.shape[0]
        live = torch.arange(rows, device=device)  # output row of each row still in the batch
        stops = torch.tensor(stop_ids, device=device)
        tokens = torch.full((rows, params.max_new_tokens), -1, dtype=torch.long, device=device)  # -1: not sampled
        logprobs = torch.zeros((rows, params.max_new_tokens), device=device) if params.logprobs else None
        done = torch.zeros(rows, dtype=torch.bool, device=device)  # stopped rows still in the batch
        temperature = params.temperature if params.scaled_logprobs and params.temperature > 0 else 1.0
        for step in range(params.max_new_tokens):
            drawn = sampler(logits)  # (R,)
            active = ~done
            tokens[live[active], step] = drawn[active]
            if logprobs is not None:  # under the raw model distribution (or logits / T), before any other warper
                scores = logits.float() / temperature if temperature != 1.0 else logits.float()
                chosen = scores.log_softmax(-1).gather(1, drawn[:, None])[:, 0]
                logprobs[live[active], step] = chosen[active]
            done = done | torch.isin(drawn, stops)
            if step == params.max_new_tokens - 1 or bool(done.all()) or (should_stop is not None and should_stop()):
                break
            if editable and int(done.sum()) * 8 >= len(done):  # stopped rows leave the batch and its cache (in
                # bulk: a copy of the whole cache per step would cost more than decoding a few stopped rows)
                keep = (~done).nonzero()[:, 0]
                cache.batch_select_indices(keep)
                live, drawn, mask, next_position, done = live[keep], drawn[keep], mask[keep], next_position[keep], done[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = model(input_ids=drawn[:, None], attention_mask=mask, position_ids=next_position,
                        use_cache=True, **{cache_keyword: cache})
            logits = out.logits[:, -1, :].to(device)  # (a model split across devices ends on its last)
            next_position = next_position + 1
        lengths = (tokens >= 0).sum(dim=1).tolist()  # each row's tokens are a prefix of its line
        token_lists = [ids[:n] for ids, n in zip(tokens.tolist(), lengths)]
        logprob_lists = [values[:n] for values, n in zip(logprobs.tolist(), lengths)] if logprobs is not None \
            else [None] * rows
        return list(zip(token_lists, logprob_lists))


class VLLMEngine:
    """vLLM backend (GPU). Takes posttrain-rendered prompt token ids, so prompts match the built-in engine's.

    For RL (``rollout=True``) it is colocated with the trainer: its log-probs are vLLM's ``processed_logprobs``
    (of logits / T, what RL trains), and :meth:`load_weights` takes the policy's new weights after each step
    (:func:`sync_weights`). Every call runs under a deadline (``timeout_s``): a hung engine stops the run loudly."""

    def __init__(self, path: str | Path, *, chat_template: str = "", rollout: bool = False, timeout_s: float = 0,
                 **llm_kwargs):
        try:
            from vllm import LLM  # optional dependency: only imported here
        except ImportError as err:
            raise ImportError(f"the vLLM engine needs vllm (pip install 'posttrain[vllm]') on a CUDA machine: {err}") \
                from None
        from posttrain.models.loading import load_tokenizer

        if not torch.cuda.is_available():
            raise ValueError("the vLLM engine runs on a CUDA GPU and this machine has none (use the built-in engine: "
                             "--rollout_engine=hf / --backend=hf)")
        self.tokenizer = load_tokenizer(path, chat_template or None)
        self.rollout, self.timeout_s = rollout, timeout_s
        if rollout:
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        with deadline(timeout_s, "vLLM start-up"):
            self.llm = LLM(model=str(path), **llm_kwargs)

    def load_weights(self, named_tensors) -> None:
        """Replace the engine's weights in place (its model's ``load_weights``, the colocated path TRL uses) and
        drop the prefix cache computed with the old ones."""
        with deadline(self.timeout_s, "vLLM weight update"):
            _vllm_model(self.llm).load_weights(named_tensors)
            if hasattr(self.llm, "reset_prefix_cache"):
                self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the engine's KV cache (and offload its weights) while the trainer trains (vLLM sleep mode)."""
        with deadline(self.timeout_s, "vLLM sleep"):
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        with deadline(self.timeout_s, "vLLM wake-up"):
            self.llm.wake_up()

    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Completion]]:
        with deadline(self.timeout_s, "vLLM generation"):
            return self._generate(prompts, params)

    def _generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        if params.scaled_logprobs and not self.rollout:
            raise NotImplementedError("scaled_logprobs (log-probs of logits / T) need the engine built for rollouts "
                                      "(VLLMEngine(..., rollout=True): vLLM's processed_logprobs)")
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


def _vllm_model(llm):
    """The torch model inside a colocated ``vllm.LLM``, found along the paths vLLM versions put it on (V1 with
    in-process engine core, V0); a clear error naming what was tried otherwise."""
    paths = ("llm_engine.model_executor.driver_worker.worker.model_runner.model",
             "llm_engine.model_executor.driver_worker.model_runner.model")
    for path in paths:
        target = llm
        for part in path.split("."):
            target = getattr(target, part, None)
            if target is None:
                break
        if target is not None and hasattr(target, "load_weights"):
            return target
    try:
        import vllm

        version = vllm.__version__
    except (ImportError, AttributeError):
        version = "unknown"
    raise WeightSyncError(f"cannot reach the model inside vLLM {version} to update its weights (tried "
                          f"{', '.join('llm.' + p for p in paths)}); colocated updates need the engine core in this "
                          "process: set VLLM_ENABLE_V1_MULTIPROCESSING=0")


class WeightSyncError(RuntimeError):
    """The rollout engine could not take the policy's weights; training on would sample from a stale policy."""


def engine_weights(model):
    """The policy's weights as (name, tensor) under the names of its Hugging Face checkpoint, what an inference
    engine's ``load_weights`` expects. A peft model's LoRA layers send base weight + their delta (B A x scale),
    computed out of place: merging into the frozen base and unmerging after would not give it back bit for bit,
    and that base is also the reference. Wrapper prefixes and the LoRA tensors themselves are left out."""
    deltas = {}
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                if module.base_layer.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    raise WeightSyncError(f"{name}: a quantized base (--load_in_4bit) cannot be sent to the rollout "
                                          "engine; use --rollout_engine=hf with QLoRA")
                active = [a for a in module.active_adapters if a in module.lora_A]
                if active:
                    with torch.no_grad():
                        deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in active)
    for name, tensor in model.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        yield name.replace(".base_layer.", ".").replace(".original_module.", "."), tensor.detach()


def sync_weights(engine, model) -> int:
    """Push the policy's current weights into the rollout ``engine`` (after every optimizer step, before the next
    rollout); returns the number of tensors sent. Any failure is raised (:class:`WeightSyncError`), never ignored:
    a silently stale engine would make every later rollout off-policy."""
    sent = 0

    def counted():
        nonlocal sent
        for item in engine_weights(model):
            sent += 1
            yield item

    try:
        engine.load_weights(counted())
    except WeightSyncError:
        raise
    except Exception as err:  # noqa: BLE001  (whatever the engine raised, with what it was given)
        raise WeightSyncError(f"the rollout engine rejected the policy's weights after {sent} tensors: "
                              f"{type(err).__name__}: {err}") from err
    return sent


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Fail loudly instead of hanging: if the block runs past ``seconds`` (0 = no limit), print what hung with
    every thread's stack and end the process (exit 3). A watchdog thread does it when the blocked call releases
    the GIL (sockets, CUDA waits); faulthandler does it 30 s later when it does not."""
    if not seconds:
        yield
        return
    import faulthandler
    import os
    import sys
    import threading

    done = threading.Event()

    def watchdog():
        if not done.wait(seconds):
            print(f"\nposttrain: {what} did not finish within {seconds:g} s; stopping the run (the last checkpoint "
                  "is intact). Stacks:", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            os._exit(3)

    thread = threading.Thread(target=watchdog, name=f"deadline: {what}", daemon=True)
    thread.start()
    faulthandler.dump_traceback_later(seconds + 30, exit=True)
    try:
        yield
    finally:
        done.set()
        faulthandler.cancel_dump_traceback_later()


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
             top_p: float = 1.0, batch_size: int = 32, seed: int | None = None,
             should_stop: Callable[[], bool] | None = None) -> list[Completion]:
    """One completion per prompt (greedy by default) with the built-in engine; ``should_stop`` as in
    :meth:`HFEngine.generate` (a cooperative stop, asked before each prefill and after each decoding step)."""
    params = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    engine = HFEngine(model, tokenizer, batch_size=batch_size)
    return [samples[0] for samples in engine.generate(prompts, params, should_stop=should_stop)]

"""Per-token log-probabilities and logits of given tokens, from one forward of the backbone.

Every trainer scores tokens the same way: run the backbone once over the whole batch, then the LM head only at the
positions that predict a scored token (the head is the largest single matmul of a small model, and prompts are
often half the positions). A batch says which tokens are scored in one of two ways:

* ``labels`` (B, T), -100 where not scored (the HF convention: position t-1 predicts ``labels[:, t]``) — padded
  rows (``collate_padded``) and packed or flat rows (``collate_packed`` / ``collate_flat``);
* ``predictors`` and ``targets`` (n,): flat indices (into the B*T positions) of the position whose output predicts
  each scored token, and that token — needed by shared-prompt rows (``collate_shared_prefix``), where the first
  token of the k-th completion is predicted by the prompt's last position, not by its flat neighbour.

:func:`token_logps` serves DPO / KTO (policy and reference), the Monte-Carlo KL of evaluation and, later, the RL
policy and reference; :func:`trained_token_logits` serves the likelihood losses (SFT, pretraining).
"""

from __future__ import annotations

from pathlib import Path

import torch


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head applied to selected hidden states (N, H) -> (N, V), with the model's logit post-processing."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    if getattr(config, "logit_scale", None):  # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def varlen_kwargs(batch: dict) -> dict:
    """Example boundaries of a flat batch for segment / flash attention (sdpa and eager use position_ids)."""
    if "cu_seq_lens" not in batch:
        return {}
    lengths = batch["cu_seq_lens"]
    longest = int((lengths[1:] - lengths[:-1]).max())
    kwargs = dict(cu_seq_lens_q=lengths, cu_seq_lens_k=lengths, max_length_q=longest, max_length_k=longest)
    if "segment_masks" in batch:  # shared-prompt segments (collate_shared_prefix); segment attention only
        kwargs["segment_masks"] = [m if m is None else m.to(lengths.device) for m in batch["segment_masks"]]
    return kwargs


def backbone_hidden(model, batch: dict) -> torch.Tensor:
    """Backbone hidden states (B*T, H) of a batch (padded, packed, flat or shared-prompt), its tensors moved to the
    model's device; segment boundaries and masks go to the attention via ``varlen_kwargs``."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if hasattr(model, "get_base_model"):  # peft: the wrapped model, its LoRA layers in place (peft's base_model
        model = model.get_base_model()    # is its tuner, not the backbone)
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                              position_ids=batch.get("position_ids"), use_cache=False,
                              **varlen_kwargs(batch)).last_hidden_state  # (B, T, H)
    return hidden.reshape(-1, hidden.shape[-1])


flat_hidden_states = backbone_hidden
"""(N, H) of a one-row padding-free batch: the name the reward-model code knows it by."""


def scored_positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictors, targets), both (n,): the flat index of the position that predicts each scored token, and the
    token. From ``batch["predictors"]``/``["targets"]`` when given, else from ``labels`` shifted by one."""
    if "predictors" in batch:
        return batch["predictors"], batch["targets"]
    labels = batch["labels"]  # (B, T)
    rows, width = labels.shape
    scored = labels[:, 1:] != -100  # (B, T-1): position t predicts token t+1
    flat = torch.arange(rows, device=labels.device)[:, None] * width + torch.arange(width - 1, device=labels.device)
    return flat[scored], labels[:, 1:][scored]


def trained_token_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, V) and targets (n,) at just the n positions that predict a scored token (see the module doc)."""
    hidden = backbone_hidden(model, batch)
    predictors, targets = scored_positions(batch)
    return output_logits(model, hidden[predictors.to(hidden.device)]), targets.to(hidden.device)


def token_logps(model, batch: dict, *, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | y_<t) (n,) of every scored token of ``batch``, in the order of :func:`scored_positions`, from
    one forward; with ``temperature`` != 1 of softmax(logits / T), the distribution RL samples from. Log-softmax in
    float32 at least (bf16 loses ~2 digits)."""
    logits, targets = trained_token_logits(model, batch)
    return logps_of(logits, targets, temperature)


def logps_of(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] (n,) from logits (n, V) and targets (n,), in float32 at least."""
    scores = logits.float() / temperature if temperature != 1.0 else logits.float()
    return torch.log_softmax(scores, -1).gather(-1, targets[:, None])[:, 0]


def sequence_sums(values: torch.Tensor, owners: torch.Tensor, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of per-token ``values`` (n,) and token counts, both (S,), from each token's owner (n,)."""
    owners = owners.to(values.device)
    sums = torch.zeros(num_sequences, device=values.device, dtype=values.dtype).index_add(0, owners, values)
    counts = torch.zeros(num_sequences, device=values.device, dtype=values.dtype).index_add(0, owners, torch.ones_like(values))
    return sums, counts


@torch.no_grad()
def policy_kl(policy_dir: str | Path, reference_dir: str | Path, prompts: list[list[dict]], *, n: int = 4,
              max_new_tokens: int = 64, seed: int = 0, device: str = "auto", batch_size: int = 32,
              sample_batch_size: int = 512) -> float:
    """Monte-Carlo KL(pi || pi_ref) per completion: the mean over samples y ~ pi (temperature 1) of
    sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)] (nats), end-of-turn token included (stopping is part
    of the policy). The policy's log-probs come from the engine (raw logits), the reference's from teacher-forced
    :func:`token_logps` over padding-free rows (:func:`samples_kl`)."""
    from posttrain.models.generation import HFEngine, SamplingParams

    engine = HFEngine.from_path(policy_dir, device=device, batch_size=sample_batch_size)
    samples = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=1.0,
                                                      seed=seed, logprobs=True))
    return samples_kl(engine.tokenizer, prompts, samples, reference_dir, device=device, batch_size=batch_size)


@torch.no_grad()
def samples_kl(tokenizer, prompts: list[list[dict]], samples, reference_dir: str | Path, *, device: str = "auto",
               batch_size: int = 32) -> float:
    """:func:`policy_kl` over samples already drawn from the policy at temperature 1 with ``logprobs=True``
    (``samples[i]``: the completions of ``prompts[i]``), so an evaluation that samples anyway measures the KL on
    the same samples instead of drawing new ones."""
    from posttrain.data.packing import Example, collate_flat, token_owners
    from posttrain.data.render import render_prompt
    from posttrain.models.loading import load_causal_lm, resolve_device

    reference = load_causal_lm(reference_dir, device=resolve_device(device)).eval()
    examples, policy_logps = [], []
    for prompt, completions in zip(prompts, samples):
        prompt_ids = render_prompt(tokenizer, prompt)
        for completion in completions:
            if completion.token_ids:
                if completion.logprobs is None or len(completion.logprobs) != len(completion.token_ids):
                    raise ValueError("samples_kl needs the policy's log-probs of every sampled token "
                                     "(SamplingParams(logprobs=True))")
                examples.append(Example(prompt_ids + completion.token_ids,
                                        [0] * len(prompt_ids) + [1] * len(completion.token_ids)))
                policy_logps.append(sum(completion.logprobs))
    if not examples:
        return 0.0
    total = 0.0
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate_flat(chunk, pad_id)
        ref_sums, _ = sequence_sums(token_logps(reference, batch).double(), token_owners(batch), len(chunk))
        total += sum(policy_logps[start : start + batch_size]) - float(ref_sums.sum())
    return total / len(examples)

"""Everything that runs a model: loading (local directories only), heads (reward / value), padding-free attention,
per-token log-probs and the generation engine. ``posttrain.modeling`` (the first home of the loading and log-prob
functions) is this package."""

from posttrain.models.loading import (
    load_causal_lm,
    load_tokenizer,
    prepare_for_training,
    resize_for_tokenizer,
    resolve_device,
    set_threads,
    use_segment_attention,
)
from posttrain.models.logprobs import (
    backbone_hidden,
    flat_hidden_states,
    output_logits,
    policy_kl,
    scored_positions,
    sequence_sums,
    token_logps,
    trained_token_logits,
    varlen_kwargs,
)

__all__ = [
    "backbone_hidden", "flat_hidden_states", "load_causal_lm", "load_tokenizer", "output_logits", "policy_kl",
    "prepare_for_training", "resize_for_tokenizer", "resolve_device", "scored_positions", "sequence_sums", "set_threads", "token_logps",
    "trained_token_logits", "use_segment_attention", "varlen_kwargs",
]

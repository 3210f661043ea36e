"""Padding-free attention for packed rows, registered with transformers' ``AttentionInterface``.

A packed batch is ONE row holding several examples back to back. The linear layers (most of the FLOPs) run on that
row with no padding at all; attention runs causally *within each example* (one ``scaled_dot_product_attention`` call
per example, ``is_causal=True``), so no dense block-diagonal mask over the whole row is built or multiplied.
The example boundaries arrive as ``cu_seq_lens_q`` (cumulative lengths, the flash-attention varlen convention),
which transformers forwards from the model call to every attention layer.

A segment can also hold a prompt shared by several completions (``collate_shared_prefix``): then
``segment_masks[i]`` is its (L, L) boolean mask (True = may attend) and replaces the plain causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "posttrain_segments"


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (1, H, T, D), key/value (1, H_kv, T, D) -> (1, T, H, D), causal within each [cu[i], cu[i+1])."""
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None or query.shape[0] != 1 or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    cuts = boundaries.tolist()
    masks = kwargs.get("segment_masks") or [None] * (len(cuts) - 1)
    for start, end, mask in zip(cuts[:-1], cuts[1:], masks):
        if mask is not None:
            mask = mask.to(query.device)
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], attn_mask=mask,
            is_causal=mask is None, scale=scaling, dropout_p=dropout if module.training else 0.0, enable_gqa=gqa))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segment_attention)
    return NAME

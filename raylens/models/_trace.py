"""nnsight trace bodies. nnsight reads the source of a trace body, so they live in a real file."""

from __future__ import annotations

import torch


def trace_split_output(nn_model, envoy, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run ``nn_model`` on a batch and return the output of ``envoy``'s module, stopping the
    forward right after it. Output: the module's raw output (tensor ``(n_samples, n_tokens,
    d_model)`` or a tuple whose first item is that tensor)."""
    with nn_model.trace(input_ids=input_ids, attention_mask=attention_mask) as tracer:
        out = envoy.output.save()
        tracer.stop()
    return out

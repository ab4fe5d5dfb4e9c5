"""The training loss: cross-entropy over the LM head, computed chunk by chunk of tokens.

Qwen3's vocabulary has 151,936 entries, so fp32 logits for a batch of 8 x 2048 tokens would take 10 GB,
and their gradient as much again. `chunked_cross_entropy` never holds more than `chunk_size` rows of
logits: for each chunk it computes the logits (in the autocast dtype when autocast is on, as the LM head
would), upcasts them to fp32, takes logsumexp and the target logit, and, because the loss is the last op
of the graph, immediately turns the chunk into its gradients: d loss / d logits = softmax - onehot, then
d hidden = that @ W and d W += that^T @ hidden (accumulated in fp32). Backward only multiplies the stored
gradients by the incoming scalar. This is the fused linear cross-entropy of Liger-Kernel / Apple's "cut
cross-entropy" in plain PyTorch: no pass recomputes the logits, and memory is one chunk of logits plus a
(V, H) fp32 gradient buffer, which the parameter's gradient needs anyway.

`CausalLMLoss` is the module that DDP, FSDP and the trainer call: the model's own forward up to the final
norm (`hidden_states`, with its default backend: causal attention without a mask tensor, SDPA's
`is_causal=True`, which lets CUDA pick the flash kernel), then the chunked loss against the LM head's
weight. tests/test_train.py checks that the loss and gradients equal F.cross_entropy(model(ids)) in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model import Qwen3ForCausalLM

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over valid rows of -log softmax(hidden @ weight^T)[target], with gradients made in forward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_size: int,
        compute_dtype: torch.dtype,
        grad_hidden_needed: bool,
        grad_weight_needed: bool,
    ) -> Tensor:
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 when computing in fp64
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if grad_weight_needed else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(compute_dtype)  # (n, H)
            t = targets[start : start + chunk_size]  # (n,)
            logits = (h @ w.T).to(acc_dtype)  # (n, V), the only (n, V) tensor alive
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(t), device=t.device), t] -= 1.0
            grad = grad.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad @ w
            if grad_weight is not None:
                grad_weight += (grad.T @ h).to(acc_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int = 2048,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "sum",
) -> Tensor:
    """Cross-entropy of logits = hidden @ weight^T against targets, `chunk_size` tokens at a time.

    hidden (N, H), weight (V, H), targets (N,). Targets equal to `ignore_index` add nothing to the loss
    and get zero gradient (their rows are dropped before any logits are computed). reduction "sum" gives
    the total nats, "mean" divides by the number of valid targets. Under autocast the matmuls run in the
    autocast dtype and everything after them in fp32.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction: expected 'sum' or 'mean', found {reduction!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: must be positive, found {chunk_size}")
    valid = targets != ignore_index
    rows = valid.nonzero().squeeze(1)  # host sync; this function is not meant to be compiled
    hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    grad_on = torch.is_grad_enabled()
    total = _LinearCrossEntropy.apply(
        hidden,
        weight,
        targets,
        chunk_size,
        compute_dtype,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total


class CausalLMLoss(nn.Module):
    """forward(input_ids (B, T), targets (B, T)) -> summed nats over targets != IGNORE_INDEX.

    Rows are full blocks starting at position 0, so the model's own forward with its default backend (plain
    causal attention, no mask tensor) is exactly right. With `activation_checkpointing`, each decoder layer
    is wrapped (torch's composable `checkpoint`, which keeps parameter names): its activations are
    recomputed in backward instead of stored."""

    def __init__(self, model: Qwen3ForCausalLM, chunk_size: int = 2048, activation_checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        if activation_checkpointing:
            for layer in model.model.layers:
                checkpoint_layer(layer)

    def forward(self, input_ids: Tensor, targets: Tensor) -> Tensor:
        hidden = self.model.hidden_states(input_ids)  # (B, T, H): embedding, layers, final norm
        return chunked_cross_entropy(
            hidden.flatten(0, 1), self.model.lm_head.weight, targets.flatten(), self.chunk_size, reduction="sum"
        )


def checkpoint_layer(layer: nn.Module) -> None:
    """Recompute `layer`'s activations in backward (once per module; a second call does nothing)."""
    from torch.distributed._composable import checkpoint as composable_checkpoint

    if composable_checkpoint.state(layer) is None:
        composable_checkpoint(layer)

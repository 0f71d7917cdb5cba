"""Loss functions handed to megatron-core's forward/backward schedules.

Each returns ``(loss, report)``: the schedule scales `loss` by 1 / num_microbatches *in place*
and backpropagates it; `report` holds detached copies (clones: a plain detach() would share
storage with `loss` and be scaled too) that are averaged for logging.
Notation: b micro-batch size, s sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token losses [b, s] over positions where mask [b, s] is 1."""
    mask = mask.to(per_token.dtype).reshape(per_token.shape)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def gpt_loss(output: torch.Tensor, loss_mask: torch.Tensor):
    """Causal LM: `output` is the per-token cross entropy [b, s] returned by GPTModel."""
    loss = masked_mean(output.float(), loss_mask)
    value = loss.detach().clone()
    return loss, {"loss": value, "lm_loss": value}


def bert_loss(output, batch: dict, binary_head: bool):
    """Masked LM (+ sentence-order prediction): `output` is (lm loss [b, s], sop logits [b, 2])."""
    lm_per_token, sop_logits = output
    lm = masked_mean(lm_per_token.float(), batch["loss_mask"])
    report = {"lm_loss": lm.detach().clone()}
    loss = lm
    if binary_head and sop_logits is not None:
        sop = F.cross_entropy(sop_logits.float().view(-1, 2), batch["is_random"].view(-1).long())
        loss = lm + sop
        report["sop_loss"] = sop.detach().clone()
    report["loss"] = loss.detach().clone()
    return loss, report

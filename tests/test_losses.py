"""Loss functions: values, masking, and reports that survive the schedule's in-place scaling."""

import torch

from megatron_moe_ext.training.losses import bert_loss, gpt_loss, masked_mean


def test_masked_mean_ignores_masked_positions():
    per_token = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(per_token, mask).item() == 2.5


def test_report_is_not_scaled_by_the_schedule():
    # megatron-core's forward_step does `output_tensor /= num_microbatches` in place
    loss, report = gpt_loss(torch.tensor([[2.0, 4.0]]), torch.ones(1, 2))
    loss /= 4
    assert report["loss"].item() == 3.0 and loss.item() == 0.75


def test_bert_loss_adds_sentence_order_loss():
    lm = torch.tensor([[1.0, 3.0]])
    logits = torch.tensor([[10.0, -10.0]])
    batch = {"loss_mask": torch.ones(1, 2), "is_random": torch.tensor([1])}
    loss, report = bert_loss((lm, logits), batch, binary_head=True)
    assert report["lm_loss"].item() == 2.0
    assert report["sop_loss"].item() > 15  # confidently wrong
    assert loss.item() == report["lm_loss"].item() + report["sop_loss"].item()

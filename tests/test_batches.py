"""Batch plumbing: inputs and targets of every batch form, calibration sets, fp32 copies."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet

from bayesq_lightning.batches import (
    LogitsModel,
    batch_inputs,
    calibration_samples,
    fp32_logits_copy,
    split_batch,
)


def test_split_batch_forms():
    x, y = torch.zeros(3, 2), torch.arange(3)
    assert split_batch((x, y))[1] is y and split_batch([x])[1] is None
    assert split_batch(x) == (x, None)
    batch = {"input_ids": x, "labels": y}
    assert split_batch(batch) == (batch, y)


def test_calibration_samples_counts_the_first_batches():
    loader = [(torch.zeros(4, 2), torch.zeros(4)), (torch.zeros(3, 2), torch.zeros(3)),
              (torch.zeros(5, 2), torch.zeros(5))]
    batches, n = calibration_samples(loader, 2)
    assert len(batches) == 2 and n == 7
    dicts = [{"input_ids": torch.zeros(6, 4, dtype=torch.long)}]
    assert calibration_samples(dicts, 8)[1] == 6


def test_empty_calibration_loader_is_refused():
    with pytest.raises(ValueError, match="no samples"):
        calibration_samples([], 4)


def test_fp32_copy_shares_nothing_and_runs_inputs_in_fp32():
    model = TinyNet().bfloat16()
    net, device, modules = fp32_logits_copy(model)
    assert isinstance(net, LogitsModel) and not any(m.training for m in net.model.modules())
    assert set(modules) == {n for n, _ in model.named_modules()}
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert model.fc1.weight.dtype == torch.bfloat16  # the original is untouched
    with torch.no_grad():
        modules["fc1"].weight.zero_()
    assert model.fc1.weight.abs().sum() > 0
    (x,) = batch_inputs([(torch.randn(2, 1, 8, 8).bfloat16(), torch.zeros(2))], device)
    assert x.dtype == torch.float32 and net(x).shape == (2, 4)


def test_nan_or_inf_in_calibration_inputs_is_named_before_any_work(tiny_net):
    from bayesq_lightning import BayesQConfig, quantize_model

    x = torch.randn(8, 1, 8, 8)
    bad = x.clone()
    bad[2, 0, 1, 1] = float("inf")
    y = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"batch 1 of the calibration loader has NaN or inf in "
                                         r"its inputs \(1 sample"):
        calibration_samples([(x, y), (bad, y)], 4)
    ids = {"input_ids": torch.ones(2, 3, dtype=torch.long), "mask": torch.tensor([[1.0], [float("nan")]])}
    with pytest.raises(ValueError, match="NaN or inf in its mask"):
        calibration_samples([ids], 1)
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_model(tiny_net, [(bad, y)], BayesQConfig(bits=3.0), n_data=8, progress=False)
    assert all(torch.equal(v, tiny_net.state_dict()[k]) for k, v in before.items())


def test_a_batch_of_another_shape_is_named(tiny_net):
    from bayesq_lightning import BayesQConfig, quantize_model

    x, y = torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"do not fit the model \(batch 1: "):
        quantize_model(tiny_net.eval(), [(x, y), (x[:, :, :7, :7], y)], BayesQConfig(bits=3.0),
                       n_data=8, progress=False)

"""EMACallback / ParameterEMA: the update rule, exactly, in a manual loop and inside a Trainer."""

from __future__ import annotations

import pytest
import torch

from safedelta.ema import EMA_FILE, EMACallback, EMAError, ParameterEMA
from tests.helpers.tiny import make_tiny_model


def _snapshot(model):
    return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_manual_loop_follows_the_formula_exactly():
    torch.manual_seed(0)
    model = make_tiny_model(seed=1)
    model.train()
    beta = 0.9
    ema = ParameterEMA(beta)
    ema.start(model)
    expected = _snapshot(model)
    theta0 = _snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(3, 200, (2, 12))
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
        for n, p in _snapshot(model).items():
            expected[n] = beta * expected[n] + (1 - beta) * p
    assert ema.num_updates == 4
    moved = 0.0
    for n, s in ema.shadow.items():
        assert s.dtype == torch.float32
        torch.testing.assert_close(s.double(), expected[n], rtol=1e-6, atol=1e-7)
        moved = max(moved, float((s.double() - theta0[n]).abs().max()))
    assert moved > 1e-4  # training really moved the weights, so the check is not vacuous
    ema.copy_to(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=1e-6, atol=1e-7)


def test_beta_zero_tracks_the_last_iterate_and_bad_beta_is_refused():
    model = make_tiny_model(seed=2)
    ema = ParameterEMA(0.0)
    ema.start(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        assert torch.equal(ema.shadow[n], p.detach())
    with pytest.raises(EMAError, match="beta"):
        ParameterEMA(1.0)
    with pytest.raises(EMAError, match="start"):
        ParameterEMA(0.5).update(model)


def test_save_and_load_round_trip(tmp_path):
    model = make_tiny_model(seed=3)
    ema = ParameterEMA(0.95)
    ema.start(model)
    ema.update(model)
    path = ema.save(tmp_path)
    assert path.name == EMA_FILE
    other = ParameterEMA(0.95)
    other.load(tmp_path)
    assert other.num_updates == 1
    assert set(other.shadow) == set(ema.shadow)
    for n in ema.shadow:
        assert torch.equal(other.shadow[n], ema.shadow[n])


def test_trainer_callback_swaps_in_the_average(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = make_tiny_model(seed=4)
    theta0 = _snapshot(model)
    seen: list[dict] = []

    class Record(TrainerCallback):  # runs after EMACallback in on_step_end: sees theta_t
        def on_step_end(self, args, state, control, model=None, **kw):
            seen.append(_snapshot(model))

    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(3, 200, (6, 10))]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                             num_train_epochs=1, learning_rate=1e-2, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    beta = 0.8
    cb = EMACallback(beta=beta)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, Record()]).train()
    assert len(seen) == 3 and cb.ema.num_updates == 3
    expected = dict(theta0)
    for snap in seen:
        expected = {n: beta * expected[n] + (1 - beta) * snap[n] for n in expected}
    for n, p in model.named_parameters():  # swapped in at train end
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=1e-5, atol=1e-6)
    last = seen[-1]
    assert any(float((expected[n] - last[n]).abs().max()) > 1e-5 for n in expected)

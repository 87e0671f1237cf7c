"""MAGIC's machinery: the replay of a fine-tuning run is the run (same adapter as `finetune`), its
metagradients equal central finite differences of the same replay, the adjoints of several test examples
batched equal them one at a time, and the first-order prediction of dropping one example tracks what
retraining with that example's weight set to 0 (every batch and dropout mask as recorded) does."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.data.templates import PromptSettings, encode_examples
from llm_attribution.features.replay import TrainingReplay, schedule
from llm_attribution.models.finetune import TrainSettings, epoch_learning_rates
from llm_attribution.models.lora import lora_parameters
from llm_attribution.models.resolve import load_model
from llm_attribution.models.retrain import Retrainer
from llm_attribution.models.settings import LoraSettings, ModelSettings
from tests.helpers import toy_task

PROMPT = PromptSettings(max_length=48)
# batch 4 of 24: six steps an epoch; LoRA dropout 0.1 and clipping at 1.0 (the defaults) both active
TRAIN = TrainSettings(epochs=2, batch_size=4, learning_rate=3e-3, seed=5)


def _replay(tmp_path, train: TrainSettings = TRAIN, double: bool = False):  # type: ignore[no-untyped-def]
    task = toy_task()
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    base = loaded.model.double() if double else loaded.model
    retrainer = Retrainer(base, loaded.tokenizer, LoraSettings(), seed=train.seed)
    trained = None
    if not double:
        retrainer.train(task.train, PROMPT, train, tmp_path / "work")
        trained = {k: v.detach().clone() for k, v in lora_parameters(retrainer.model).items()}
    replay = TrainingReplay(retrainer.restore(), loaded.tokenizer, task.train, PROMPT, train)
    return task, replay, trained, encode_examples(task.test, loaded.tokenizer, PROMPT)


def _test_losses(replay: TrainingReplay, weights: torch.Tensor, encoded) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return replay.test_losses(replay.run(weights), encoded).double()


def test_the_schedule_is_finetunes() -> None:
    steps = schedule(24, TRAIN)
    assert len(steps) == 12 and [s.count for s in steps] == list(range(1, 13))
    for epoch in (0, 1):  # each epoch visits every example once, in a shuffled order
        rows = sorted(r for s in steps[6 * epoch : 6 * epoch + 6] for r in s.rows)
        assert rows == list(range(24))
    assert steps[0].rows != steps[6].rows
    # the mean learning rate of each epoch's steps is the one TracIn weighs the epoch with
    rates = epoch_learning_rates(TRAIN, 24)
    for epoch in (1, 2):
        mean = sum(s.learning_rate for s in steps[6 * (epoch - 1) : 6 * epoch]) / 6
        assert mean == pytest.approx(rates[epoch], rel=1e-12)


def test_the_replay_ends_with_the_adapter_finetune_trained(tmp_path) -> None:
    _, replay, trained, _ = _replay(tmp_path)
    final = replay.final()
    assert trained is not None and final.keys() == trained.keys()
    for name, tensor in trained.items():
        assert float((final[name] - tensor).abs().max()) <= 1e-5 * float(tensor.abs().max()), name
    # a replay without example 0's loss ends elsewhere: the weights reach the steps
    weights = torch.ones(24)
    weights[0] = 0
    other = replay.run(weights)
    assert max(float((other[k] - final[k]).abs().max()) for k in final) > 1e-4


def test_metagradients_equal_finite_differences_of_the_replay(tmp_path) -> None:
    # float64 weights; AdamW's epsilon raised so that the loss is smooth at the finite differences' scale
    # (at 1e-8 the first steps are nearly sign(g), whose curvature no step h resolves above the float32
    # rounding inside the model's norms). Measured: relative error 7e-4 at h = 3e-3.
    smooth = TrainSettings(epochs=2, batch_size=4, learning_rate=3e-3, seed=5, adam_epsilon=1e-3)
    _, replay, _, encoded = _replay(tmp_path, smooth, double=True)
    test = toy_task().test[:2]
    got = replay.metagradients(test, queries_per_pass=2)
    h = 3e-3
    want = torch.zeros(2, 24, dtype=torch.float64)
    ones = torch.ones(24, dtype=torch.float64)
    for i in range(24):
        step = torch.zeros(24, dtype=torch.float64)
        step[i] = h
        plus, minus = (
            _test_losses(replay, ones + step, encoded[:2]),
            _test_losses(replay, ones - step, encoded[:2]),
        )
        want[:, i] = (plus - minus) / (2 * h)
    assert float((got - want).norm() / want.norm()) < 5e-3
    # the adjoints of both queries carried together equal each carried alone
    alone = torch.cat([replay.metagradients([example], queries_per_pass=1) for example in test])
    assert torch.allclose(got, alone, rtol=1e-9, atol=1e-12)


def test_the_predicted_effect_of_dropping_one_example_tracks_its_zero_weight_retrain(tmp_path) -> None:
    task, replay, _, encoded = _replay(tmp_path)
    predicted = -replay.metagradients(task.test, queries_per_pass=3)  # [6 test, 24 train]: magic's scores
    base = _test_losses(replay, torch.ones(24), encoded)
    measured = torch.zeros_like(predicted)
    for i in range(24):
        weights = torch.ones(24)
        weights[i] = 0
        measured[:, i] = _test_losses(replay, weights, encoded) - base
    # measured 0.85 here: Adam's normalisation makes removing one of a batch's four examples non-linear,
    # yet the first-order prediction orders the 144 effects as retraining does
    assert float(torch.corrcoef(torch.stack([predicted.flatten(), measured.flatten()]))[0, 1]) > 0.75
    agree = (predicted.sign() == measured.sign()).double().mean()
    assert float(agree) > 0.75

"""Token-level Kronecker factors collected in the batched gradient pass, against a batch-size-1 loop
that hooks every LoRA matrix itself."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.data.templates import PromptSettings, collate, encode_examples
from llm_attribution.features.gradients import GradientSettings, collect_features, per_example_losses
from llm_attribution.features.kronecker import KroneckerFactors
from llm_attribution.models.lora import attach_lora
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import LoraSettings, ModelSettings
from llm_attribution.models.tuning import LoraWeights
from tests.helpers import toy_task

PROMPT = PromptSettings(max_length=40)


@pytest.fixture(scope="module")
def lora_model():
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings(lora_targets=("q_proj", "v_proj")))
    with torch.no_grad():  # LoRA B starts at zero: give every block a non-trivial gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    return model, loaded.tokenizer


def _reference(model, tokenizer, examples) -> tuple[dict, dict, dict]:
    """Per example on its own: every token's input and output gradient of each LoRA matrix, summed as
    the definition says over the tokens whose output gradient is not zero (``u u^T``; ``g g^T``, the
    example's own mean loss), and those tokens counted per block."""
    modules = LoraWeights(model).modules()
    inputs = {name: 0.0 for name in modules}
    outputs = {name: 0.0 for name in modules}
    tokens = {name: 0 for name in modules}
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, out, name=name: kept.__setitem__(name, (a[0], out)))
        for name, m in modules.items()
    ]
    try:
        for encoded in encode_examples(examples, tokenizer, PROMPT):
            batch = collate([encoded], tokenizer.pad_token_id)
            labels = batch.pop("labels")
            loss, _ = per_example_losses(model(**batch).logits, labels)
            grads = torch.autograd.grad(loss.sum(), [kept[name][1] for name in modules])
            for name, g in zip(modules, grads, strict=True):
                carrying = [t for t in range(g.shape[1]) if bool(g[0, t].abs().max() > 0)]
                u, g_kept = kept[name][0][0].detach()[carrying], g[0][carrying]
                tokens[name] += len(carrying)
                inputs[name] = inputs[name] + u.T @ u
                outputs[name] = outputs[name] + g_kept.T @ g_kept
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs, tokens


def test_factors_equal_a_per_example_loop(lora_model) -> None:
    model, tokenizer = lora_model
    examples = toy_task(n_train=9).train
    inputs, outputs, tokens = _reference(model, tokenizer, examples)
    factors = KroneckerFactors()
    collect_features(
        model, tokenizer, examples, PROMPT, GradientSettings(gradient_batch_size=4), kronecker=factors
    )
    assert (factors.tokens, factors.examples) == (tokens, len(examples))
    assert set(factors.inputs) == set(inputs) and len(inputs) == 2 * 2 * 2  # layers x targets x (A, B)
    every = sum(len(e.input_ids) for e in encode_examples(examples, tokenizer, PROMPT))
    # each sequence's last token feeds no loss term, so no block counts it
    assert all(n <= every - len(examples) for n in tokens.values()) and min(tokens.values()) > 0
    for name in inputs:
        s, a = factors.covariances(name)
        torch.testing.assert_close(a, (inputs[name] / tokens[name]).double(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s, (outputs[name] / len(examples)).double(), rtol=1e-5, atol=1e-9)


def test_factors_add_up_over_batches_and_pieces(lora_model) -> None:
    """Batches, shards and ranks may split the examples anywhere: the factors are the same sums."""
    model, tokenizer = lora_model
    examples = toy_task(n_train=10).train
    whole = KroneckerFactors()
    collect_features(
        model, tokenizer, examples, PROMPT, GradientSettings(gradient_batch_size=3), kronecker=whole
    )
    first, second = KroneckerFactors(), KroneckerFactors()
    collect_features(
        model, tokenizer, examples[:4], PROMPT, GradientSettings(gradient_batch_size=8), kronecker=first
    )
    collect_features(
        model, tokenizer, examples[4:], PROMPT, GradientSettings(gradient_batch_size=2), kronecker=second
    )
    merged = first.merged(second)
    restored = KroneckerFactors.from_tensors(merged.to_tensors())
    assert (restored.tokens, restored.examples) == (whole.tokens, whole.examples)
    for name in whole.inputs:  # other batch widths round the float32 forward differently
        for got, want in (
            (restored.inputs[name], whole.inputs[name]),
            (restored.outputs[name], whole.outputs[name]),
        ):
            assert float((got - want).norm() / want.norm()) < 1e-5


def test_projected_factors_describe_the_projected_gradients(lora_model) -> None:
    """With a projection the factors are of the projected sides, so their shapes match the stored rows."""
    model, tokenizer = lora_model
    examples = toy_task(n_train=6).train
    factors = KroneckerFactors()
    settings = GradientSettings(gradient_batch_size=4, projection_dim=16)
    features = collect_features(model, tokenizer, examples, PROMPT, settings, kronecker=factors)
    for name, (o, i) in features.shapes.items():
        s, a = factors.covariances(name)
        assert (s.shape, a.shape) == ((o, o), (i, i))

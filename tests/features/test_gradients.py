"""Batched per-example gradients against the definition: a batch-size-1 autograd loop."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.data.templates import PromptSettings, collate, encode_examples
from llm_attribution.features.gradients import GradientSettings, collect_features, per_example_losses
from llm_attribution.features.tokens import token_features
from llm_attribution.models.lora import attach_lora
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import LoraSettings, ModelSettings
from llm_attribution.models.tuning import block_name, lora_modules
from tests.helpers import toy_task

REL_TOL = 1e-5
PROMPT = PromptSettings(max_length=40)


@pytest.fixture(scope="module")
def lora_model():
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings(lora_targets=("q_proj", "v_proj", "o_proj")))
    # LoRA B starts at zero; give it values so every block has a non-trivial gradient.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    return model, loaded.tokenizer


def _reference(model, tokenizer, examples) -> dict[str, torch.Tensor]:
    """One backward per example through the parameters: the definition, slow."""
    params = {block_name(n.removesuffix(".weight")): p for n, p in model.named_parameters() if "lora_" in n}
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    for enc in encode_examples(examples, tokenizer, PROMPT):
        batch = collate([enc], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        loss, _ = per_example_losses(model(**batch).logits, labels)
        grads = torch.autograd.grad(loss.sum(), list(params.values()))
        for k, g in zip(params, grads, strict=True):
            rows[k].append(g.reshape(-1))
    return {k: torch.stack(v) for k, v in rows.items()}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_batched_equals_batch_size_one_loop(lora_model) -> None:
    model, tokenizer = lora_model
    examples = toy_task(n_train=11).train
    reference = _reference(model, tokenizer, examples)
    got = collect_features(model, tokenizer, examples, PROMPT, GradientSettings(gradient_batch_size=4)).blocks
    assert got.keys() == reference.keys()
    assert len(got) == 2 * 2 * 3  # 2 layers x 3 targets x (A, B)
    for name in got:
        assert got[name].shape == reference[name].shape
        assert _rel_err(got[name], reference[name]) < REL_TOL, name


@pytest.mark.parametrize("batch_size", [1, 3, 11])
def test_batch_size_does_not_change_gradients(lora_model, batch_size: int) -> None:
    model, tokenizer = lora_model
    examples = toy_task(n_train=11).train
    base = collect_features(model, tokenizer, examples, PROMPT, GradientSettings(gradient_batch_size=5))
    other = collect_features(
        model, tokenizer, examples, PROMPT, GradientSettings(gradient_batch_size=batch_size)
    )
    for name in base.blocks:
        assert _rel_err(other.blocks[name], base.blocks[name]) < REL_TOL, name
    assert torch.allclose(other.losses, base.losses, rtol=1e-5)
    assert torch.allclose(other.representations, base.representations, rtol=1e-4, atol=1e-5)


def test_padding_side_does_not_change_gradients(lora_model) -> None:
    model, tokenizer = lora_model
    examples = toy_task(n_train=6).train
    encoded = encode_examples(examples, tokenizer, PROMPT)
    modules = lora_modules(model)
    results = []
    for side in ("right", "left"):
        batch = collate(encoded, tokenizer.pad_token_id, padding_side=side)
        labels = batch.pop("labels")
        loss, _ = per_example_losses(model(**batch).logits, labels)
        # per-example gradient of one example through parameters, within a padded batch
        grads = torch.autograd.grad(loss[0], [m.weight for m in modules.values()])
        results.append(torch.cat([g.reshape(-1) for g in grads]))
    assert _rel_err(results[1], results[0]) < REL_TOL


def test_features_record_each_block_matrix_shape(lora_model) -> None:
    """``shapes`` are the LoRA weights' shapes, so a row reshaped to it is that weight's gradient."""
    model, tokenizer = lora_model
    examples = toy_task().train[:3]
    features = collect_features(model, tokenizer, examples, PROMPT, GradientSettings(), representations=False)
    reference = _reference(model, tokenizer, examples)
    modules = lora_modules(model)
    assert features.shapes == {name: tuple(m.weight.shape) for name, m in modules.items()}
    params = {block_name(n.removesuffix(".weight")): p for n, p in model.named_parameters() if "lora_" in n}
    for name, (o, i) in features.shapes.items():
        assert params[name].shape == (o, i)
        assert _rel_err(features.blocks[name].view(-1, o, i)[0], reference[name][0].view(o, i)) < REL_TOL


def test_block_names_are_short_and_stable(lora_model) -> None:
    model, _ = lora_model
    names = list(lora_modules(model))
    assert names[0] == "layers.0.self_attn.q_proj.lora_A"
    assert all(n.endswith(("lora_A", "lora_B")) for n in names)


def test_study_padding_gradients_equal_the_official_loss(lora_model) -> None:
    """Under ``padding="study"`` each example's gradient is that of the official code's loss: one example
    left-padded to max_length with EOS (attention mask 0), labels = input ids (pads counted), no position
    ids, the model's own mean loss, one backward through the parameters."""
    model, tokenizer = lora_model
    examples = toy_task(n_train=5).train
    study = PromptSettings(max_length=40, padding="study")
    got = collect_features(model, tokenizer, examples, study, GradientSettings(gradient_batch_size=3))
    params = {block_name(n.removesuffix(".weight")): p for n, p in model.named_parameters() if "lora_" in n}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for row, example in enumerate(examples):
            text = f"[INST] {example.prompt} [/INST] {example.response}"
            batch = tokenizer(text, truncation=True, padding="max_length", max_length=40, return_tensors="pt")
            assert (batch["attention_mask"] == 0).any()  # the example really is padded
            loss = model(**batch, labels=batch["input_ids"]).loss
            grads = torch.autograd.grad(loss, list(params.values()))
            for name, grad in zip(params, grads, strict=True):
                assert _rel_err(got.blocks[name][row], grad.reshape(-1)) < REL_TOL, name
            assert abs(float(got.losses[row]) - loss.item()) < 1e-5
    finally:
        tokenizer.padding_side = side
    # RepSim reads the last prompt token, which the left pads do not reach: the same hidden state as the
    # unpadded prompt alone (the official RepSim) and as the default padding.
    masked = collect_features(model, tokenizer, examples, PROMPT, GradientSettings(gradient_batch_size=3))
    assert torch.allclose(got.representations, masked.representations, atol=1e-5)
    assert _rel_err(got.blocks[name], masked.blocks[name]) > 1e-3  # the pads' loss changes the gradients


def test_representation_gradients_equal_one_backward_per_example(lora_model) -> None:
    """RepT's half from the batched pass: d(own loss)/d(last hidden state at the last prompt token), the
    same as one example alone (padding and the other rows of the batch change nothing)."""
    model, tokenizer = lora_model
    examples = toy_task(n_train=9).train
    got = collect_features(model, tokenizer, examples, PROMPT, GradientSettings(gradient_batch_size=4))
    assert got.representation_gradients is not None and got.representations is not None
    for row, enc in enumerate(encode_examples(examples, tokenizer, PROMPT)):
        batch = collate([enc], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        out = model(**batch, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        loss, _ = per_example_losses(out.logits, labels)
        [grad] = torch.autograd.grad(loss.sum(), [hidden])
        want = grad[0, enc.last_prompt_index]
        assert _rel_err(got.representation_gradients[row], want) < REL_TOL
        assert _rel_err(got.representations[row], hidden[0, enc.last_prompt_index].detach()) < REL_TOL
    assert float(got.representation_gradients.norm()) > 0


def test_per_token_rows_are_each_tokens_share_of_the_gradient(lora_model) -> None:
    """Row t = grad(loss of token t) / T, by one backward per token; the rows sum to the example's
    gradient."""
    model, tokenizer = lora_model
    [example] = toy_task(n_train=1).train
    settings = GradientSettings(gradient_batch_size=4)

    def collect(examples, encoded):  # type: ignore[no-untyped-def]
        return collect_features(
            model, tokenizer, examples, PROMPT, settings, representations=False, encoded=encoded
        )

    features, rows = token_features(example, tokenizer, PROMPT, collect)
    [enc] = encode_examples([example], tokenizer, PROMPT)
    params = {block_name(n.removesuffix(".weight")): p for n, p in model.named_parameters() if "lora_" in n}
    batch = collate([enc], tokenizer.pad_token_id)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    count = len(rows.positions)
    for row, position in enumerate(rows.positions[:3]):
        target = labels[0, position]
        loss = torch.nn.functional.cross_entropy(logits[0, position - 1][None].float(), target[None])
        grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
        for name, g in zip(params, grads, strict=True):
            assert _rel_err(features.blocks[name][row], g.reshape(-1) / count) < REL_TOL
    whole = collect_features(model, tokenizer, [example], PROMPT, settings).blocks
    for name, block in features.blocks.items():
        assert _rel_err(block.sum(dim=0), whole[name][0]) < REL_TOL
    assert any(rows.in_response) and rows.tokens[0] == tokenizer.decode([enc.input_ids[rows.positions[0]]])

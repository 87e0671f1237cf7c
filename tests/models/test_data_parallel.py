"""The pieces of data-parallel fine-tuning that one process can check exactly: the global-batch dropout
masks and the loss normalised by the global token count (the 2-process run is tests/pipeline)."""

from __future__ import annotations

import torch

from llm_attribution.data.templates import PromptSettings, collate, encode_examples
from llm_attribution.models.data_parallel import DataParallelSteps, GlobalBatchDropout, labelled_tokens
from llm_attribution.models.lora import attach_lora, lora_parameters
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import LoraSettings, ModelSettings
from tests.helpers import toy_task


def test_each_slice_gets_the_rows_of_the_full_batch_mask() -> None:
    x = torch.randn(5, 7, 16)
    torch.manual_seed(3)
    expected = torch.nn.functional.dropout(x, 0.3, training=True)  # one process, whole batch
    for rows in (slice(0, 3), slice(3, 5)):  # two ranks, same seed
        torch.manual_seed(3)
        dropout = GlobalBatchDropout(0.3)
        dropout.batch_rows, dropout.rows = 5, rows
        assert torch.equal(dropout(x[rows]), expected[rows])
    dropout.eval()
    assert dropout(x) is x


def test_the_step_of_one_rank_is_the_plain_step() -> None:
    """With one rank the data-parallel step is the whole batch: its loss and gradient are the usual ones."""
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings(lora_dropout=0.0))
    params = list(lora_parameters(model).values())
    with torch.no_grad():
        for param in params:
            param.normal_(0, 0.05)  # B is zero at initialisation; give every matrix a gradient
    encoded = encode_examples(toy_task().train[:6], loaded.tokenizer, PromptSettings(max_length=48))
    pad_id = loaded.tokenizer.pad_token_id
    model.train()
    loss = model(**collate(encoded, pad_id)).loss
    loss.backward()
    expected = [p.grad.clone() for p in params]
    with DataParallelSteps(model, params, pad_id) as steps:
        parallel_loss = steps.backward(encoded)
    assert torch.allclose(parallel_loss, loss.detach(), rtol=1e-6)
    for param, grad in zip(params, expected, strict=True):
        assert torch.allclose(param.grad, grad, rtol=1e-5, atol=1e-9)
    assert sum(labelled_tokens(e) for e in encoded) == sum(len(e.labels) - 1 for e in encoded)

"""RepT's signature at every token of a few examples: which tokens of a training example look, to the
model, like the test example's answer.

A RepT signature is the last hidden state at one position joined with the gradient of the example's own
loss with respect to it. The sample-level signature (what ``rept`` scores) is the one at the prompt's
last token; here it is taken at every position the example attends to, from one batched forward and
backward pass, so that the cosine of a test signature with each of them shows the training tokens that
carry the match (a backdoor's trigger, a harmful request's key words). The signature at the prompt's
last token equals the sample-level one, so the token scores contain the example's own score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..data.schema import Example
from ..data.templates import PromptSettings, collate, encode_examples
from ..models.device import autocast
from ..models.tuning import LoraWeights, TunedWeights
from .gradients import check_rows, per_example_losses


@dataclass(frozen=True)
class TokenSignatures:
    """One example's RepT signature ``[h_t, dL/dh_t]`` at each attended position ``t``, in order."""

    id: str
    positions: list[int]  # index of each row's token in the example's input ids
    tokens: list[str]  # each token's text
    in_response: list[bool]  # whether the token belongs to the response (else to the prompt)
    last_prompt: int  # the row of the prompt's last token: the sample-level signature
    signatures: torch.Tensor  # float32 [tokens, 2 * hidden]


def token_signatures(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prompt: PromptSettings,
    weights: TunedWeights | None = None,
) -> list[TokenSignatures]:
    """The per-token signatures of ``examples`` (a handful: one batch), computed as the features are
    (eval mode, the run's autocast, the loss the run attributes)."""
    weights = LoraWeights(model) if weights is None else weights
    for module in weights.modules().values():
        module.weight.requires_grad_(True)  # so the hidden states are part of a graph to differentiate
    model.eval()
    encoded = encode_examples(examples, tokenizer, prompt)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(encoded, tokenizer.pad_token_id).items()}
    labels = batch.pop("labels")
    with autocast(model):
        out = model(**batch, output_hidden_states=True, use_cache=False)
    loss, counts = per_example_losses(out.logits, labels)
    check_rows(loss, counts, [e.id for e in examples])
    hidden = out.hidden_states[-1]
    # Each example's loss depends on its own row only, so the summed loss gives every row its own gradient.
    [grad] = torch.autograd.grad(loss.sum(), [hidden])
    found = []
    mask = batch["attention_mask"].bool().cpu()
    for row, (example, enc) in enumerate(zip(examples, encoded, strict=True)):
        positions = [p for p in range(len(enc.input_ids)) if mask[row, p]]
        first_response = enc.pad_prefix + enc.prompt_length
        index = torch.tensor(positions, device=device)
        rows = torch.cat([hidden[row, index].float(), grad[row, index].float()], dim=1).detach().cpu()
        found.append(
            TokenSignatures(
                example.id,
                positions,
                [str(tokenizer.decode([enc.input_ids[p]])) for p in positions],
                [p >= first_response for p in positions],
                positions.index(enc.last_prompt_index),
                rows,
            )
        )
    return found

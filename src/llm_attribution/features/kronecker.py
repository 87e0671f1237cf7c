"""Token-level Kronecker factors of every trained linear module, the curvature K-FAC and EK-FAC need.

A module ``y = W u`` applied at every token gives example ``i`` the gradient ``G_i = sum_t g_t u_t^T``
(``g_t``: the gradient of the example's own loss at the module's output at token ``t``). K-FAC
(Martens & Grosse, 2015) approximates the empirical Fisher of these gradients,
``F = (1/n) sum_i vec(G_i) vec(G_i)^T``, by a Kronecker product of two small covariances:

    S = (1/n) sum_i sum_t g_t g_t^T      (o x o, the output-gradient side)
    A = (1/T) sum_t u_t u_t^T             (i x i, the input side, over the block's T gradient-carrying tokens)
    F ~ S (x) A                           (row-major ``vec``: the output index varies slowest)

A token whose output gradient is exactly zero adds nothing to any ``G_i`` (each sequence's last token,
which feeds no loss term; a prompt token at the last layer's ``q_proj``), so it is left out of ``A``:
its input would only shape a basis for gradients it never carries. That set is per block, so each block
keeps its own token count. (kronfluence and Bergson average ``A`` over every non-padding token;
dattri-llm, like this, over the tokens with a gradient. On the embedded model's grammars run the two
choices differ by 0.002 LDS: docs/benchmarks.md.)

With one token per example and the same input everywhere this is exact: ``vec(G_i) = g_i (x) u`` and
``F = S (x) u u^T``, which the tests check. The factors are sums kept in float64 with their token and
example counts, so collection batches, feature-store shards and torchrun ranks add up to the same
factors. They are computed from the same hooked inputs and output gradients the per-example gradients
come from (:func:`~.gradients.collect_features`), projected the same way when a projection is asked
for, so they describe exactly the gradients that are scored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..core.errors import RunError

_INPUTS = "inputs/"
_OUTPUTS = "outputs/"
_TOKENS = "tokens/"
_EXAMPLES = "__examples__"


@dataclass
class KroneckerFactors:
    """Per block, float64 sums of ``u u^T`` and of ``g g^T`` over its gradient-carrying tokens, with the
    counts."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # block -> [i, i] sum over tokens
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # block -> [o, o] sum over tokens
    tokens: dict[str, int] = field(default_factory=dict)  # block -> tokens added (the input side's count)
    examples: int = 0  # examples seen (the output side's count)

    def add(self, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Add one batch of one block: ``[tokens, i]`` inputs and ``[tokens, o]`` output gradients of the
        tokens that carry a gradient (:func:`gradient_tokens`); every row counts as one token of ``A``.
        Examples are counted separately, by :meth:`count`."""
        in_part = (inputs.T @ inputs).to(device="cpu", dtype=torch.float64)
        out_part = (outputs.T @ outputs).to(device="cpu", dtype=torch.float64)
        if name in self.inputs:
            self.inputs[name] += in_part
            self.outputs[name] += out_part
            self.tokens[name] += inputs.shape[0]
        else:
            self.inputs[name], self.outputs[name] = in_part, out_part
            self.tokens[name] = inputs.shape[0]

    def count(self, examples: int) -> None:
        """Advance the example count by one batch's examples."""
        self.examples += examples

    def merged(self, other: KroneckerFactors) -> KroneckerFactors:
        """The factors of both sets of examples (sums and counts added)."""
        if not self.inputs:
            return other
        if not other.inputs:
            return self
        if set(self.inputs) != set(other.inputs):
            raise RunError("Kronecker factors of different blocks cannot be merged")
        return KroneckerFactors(
            {name: self.inputs[name] + other.inputs[name] for name in self.inputs},
            {name: self.outputs[name] + other.outputs[name] for name in self.outputs},
            {name: self.tokens[name] + other.tokens[name] for name in self.tokens},
            self.examples + other.examples,
        )

    def covariances(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, A)`` of one block in float64: the output-gradient covariance summed over an example's
        tokens and averaged over examples, and the input covariance averaged over the block's tokens."""
        if name not in self.inputs:
            raise RunError(f"no Kronecker factors for block {name}; collect the features again")
        return self.outputs[name] / max(self.examples, 1), self.inputs[name] / max(self.tokens[name], 1)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors file (see :meth:`from_tensors`)."""
        tensors = {_INPUTS + name: t.contiguous() for name, t in self.inputs.items()}
        tensors.update({_OUTPUTS + name: t.contiguous() for name, t in self.outputs.items()})
        tensors.update({_TOKENS + k: torch.tensor(n, dtype=torch.int64) for k, n in self.tokens.items()})
        tensors[_EXAMPLES] = torch.tensor(self.examples, dtype=torch.int64)
        return tensors

    @staticmethod
    def current(tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether stored tensors are factors of this version's token set (per-block token counts); those
        of earlier versions averaged ``A`` over every non-padding token and are gathered again."""
        return _EXAMPLES in tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> KroneckerFactors:
        if not cls.current(tensors):
            raise RunError("Kronecker factors of an earlier version (every non-padding token): gather again")
        inputs = {k[len(_INPUTS) :]: v for k, v in tensors.items() if k.startswith(_INPUTS)}
        outputs = {k[len(_OUTPUTS) :]: v for k, v in tensors.items() if k.startswith(_OUTPUTS)}
        tokens = {k[len(_TOKENS) :]: int(v) for k, v in tensors.items() if k.startswith(_TOKENS)}
        return cls(inputs, outputs, tokens, int(tensors[_EXAMPLES]))


def gradient_tokens(attention_mask: torch.Tensor, output_gradients: torch.Tensor) -> torch.Tensor:
    """``[batch, time]``: the non-padding tokens whose ``[batch, time, o]`` output gradient is not all
    zero, the tokens that add to an example's gradient and so to its block's factors."""
    present = attention_mask.to(device=output_gradients.device, dtype=torch.bool)
    return present & (output_gradients != 0).any(-1)


def flat_tokens(side: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ``[tokens, width]`` rows of a ``[batch, time, width]`` tensor where ``mask`` is set."""
    return side[mask.to(device=side.device, dtype=torch.bool)]

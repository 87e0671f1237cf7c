"""Token-level Kronecker factors of every trained linear module, the curvature K-FAC and EK-FAC need.

A module ``y = W u`` applied at every token gives example ``i`` the gradient ``G_i = sum_t g_t u_t^T``
(``g_t``: the gradient of the example's own loss at the module's output at token ``t``). K-FAC
(Martens & Grosse, 2015) approximates the empirical Fisher of these gradients,
``F = (1/n) sum_i vec(G_i) vec(G_i)^T``, by a Kronecker product of two small covariances:

    S = (1/n) sum_i sum_t g_t g_t^T      (o x o, the output-gradient side)
    A = (1/T) sum_(all tokens) u u^T     (i x i, the input side, T non-padding tokens)
    F ~ S (x) A                           (row-major ``vec``: the output index varies slowest)

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
_COUNTS = "__counts__"


@dataclass
class KroneckerFactors:
    """Per block, float64 sums of ``u u^T`` over tokens and of ``g g^T`` over tokens, with the counts."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # block -> [i, i] sum over tokens
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # block -> [o, o] sum over tokens
    tokens: int = 0  # non-padding tokens seen (the input side's count)
    examples: int = 0  # examples seen (the output side's count)

    def add(self, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Add one batch of one block: ``[tokens, i]`` inputs and ``[tokens, o]`` output gradients of its
        non-padding tokens (the counts are advanced separately, by :meth:`count`)."""
        in_part = (inputs.T @ inputs).to(device="cpu", dtype=torch.float64)
        out_part = (outputs.T @ outputs).to(device="cpu", dtype=torch.float64)
        if name in self.inputs:
            self.inputs[name] += in_part
            self.outputs[name] += out_part
        else:
            self.inputs[name], self.outputs[name] = in_part, out_part

    def count(self, tokens: int, examples: int) -> None:
        """Advance the counts by one batch's non-padding tokens and examples."""
        self.tokens += tokens
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
            self.tokens + other.tokens,
            self.examples + other.examples,
        )

    def covariances(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, A)`` of one block in float64: the output-gradient covariance summed over an example's
        tokens and averaged over examples, and the input covariance averaged over tokens."""
        if name not in self.inputs:
            raise RunError(f"no Kronecker factors for block {name}; collect the features again")
        return self.outputs[name] / max(self.examples, 1), self.inputs[name] / max(self.tokens, 1)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors file (see :meth:`from_tensors`)."""
        tensors = {_INPUTS + name: t.contiguous() for name, t in self.inputs.items()}
        tensors.update({_OUTPUTS + name: t.contiguous() for name, t in self.outputs.items()})
        tensors[_COUNTS] = torch.tensor([self.tokens, self.examples], dtype=torch.int64)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> KroneckerFactors:
        tokens, examples = (int(v) for v in tensors[_COUNTS].tolist())
        inputs = {k[len(_INPUTS) :]: v for k, v in tensors.items() if k.startswith(_INPUTS)}
        outputs = {k[len(_OUTPUTS) :]: v for k, v in tensors.items() if k.startswith(_OUTPUTS)}
        return cls(inputs, outputs, tokens, examples)


def flat_tokens(side: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ``[tokens, width]`` rows of a ``[batch, time, width]`` tensor where ``mask`` is set."""
    return side[mask.to(device=side.device, dtype=torch.bool)]

"""Attribution methods behind one interface, registered by name (math on tensors: no run folders, no
models). The interface and the engine's two schedules are in :mod:`.base`, training gradients as passes
in :mod:`.passes`, one method per module in :mod:`.methods`.

Every method returns an ``n_test x n_train`` matrix in which HIGHER = the training example supports the
test output MORE.
"""

from .base import GradientBlocks, InnerProductMethod, Method, RepresentationMethod
from .registry import available_methods, get_method, method_class, register

__all__ = [
    "GradientBlocks",
    "InnerProductMethod",
    "Method",
    "RepresentationMethod",
    "available_methods",
    "get_method",
    "method_class",
    "register",
]

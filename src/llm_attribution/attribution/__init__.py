"""Attribution methods behind one interface, registered by name.

Every method returns an ``n_test x n_train`` matrix in which HIGHER = the training example supports the
test output MORE.
"""

from .base import AttributionMethod, GradientBlocks, Method, available_methods, get_method, register

__all__ = ["AttributionMethod", "GradientBlocks", "Method", "available_methods", "get_method", "register"]

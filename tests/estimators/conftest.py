"""Estimator tests run tiny models on one intra-op thread (see ``tests._helpers.one_torch_thread``)."""

from tests._helpers import one_torch_thread  # noqa: F401  (an autouse fixture)

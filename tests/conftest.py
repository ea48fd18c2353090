"""Shared test configuration: Hypothesis profiles and float64 defaults.

Profiles (select with the ``HYPOTHESIS_PROFILE`` environment variable):
``dev`` (default, small and fast), ``ci`` (derandomised, used by ``.ci/run``),
``nightly`` (many examples, for on-demand deep runs). Under ``CI=true`` the default is ``ci``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "nightly", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

"""Hypothesis profiles for the fuzz tests, picked with ``HYPOTHESIS_PROFILE`` (default ``ci``).

* ``ci``: a short, reproducible run (``make test``): ~200 examples per test, derandomized so CI is
  stable; the whole directory stays well under a minute on a 2-core machine.
* ``long``: ``make fuzz``: 20,000 examples per test (``FUZZ_EXAMPLES``) with fresh random seeds;
  failures are saved in ``.hypothesis/`` and replayed first on the next run. ``--hypothesis-seed=N``
  reproduces a run.
* ``dev``: 50 examples, for editing the tests.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=200, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")), **_COMMON)
settings.register_profile(
    "dev", max_examples=50, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target], **_COMMON
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

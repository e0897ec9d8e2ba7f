"""The test suite. Imported before any test module, so the OpenMP setting below is in place before LightGBM loads.

LightGBM's OpenMP threads spin while they wait for work: with two test processes (xdist) on two cores, plus the
workers and servers the tests start, a training or reference ``Booster.predict`` using every core was measured
at 23 s instead of 0.02 s on one thread. One thread each; the workers under test set their own (``--threads``).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

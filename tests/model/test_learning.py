"""The learning test: a small model fine-tuned on CPU for a few minutes on synthetic
two-person clips puts the figures of held-out clips where their driving poses say, clearly
more than the untrained model and a pose-blind control trained alike, and follows the poses
it is given (driven by another clip's poses, its figures go elsewhere). bench/learning.py
holds the check itself (data, base, runs, measures) and prints every figure; here it is held
to its margins. About 5 minutes on 2 idle cores."""

from __future__ import annotations

import pytest

from bench.learning import run

# Measured at bench/learning.py's defaults (100 fine-tuning steps on a base of 200): 1.42x the
# pose-blind control, 1.54x the untrained model, 1.45x the same model driven by another clip's
# poses; a model that ignored the poses would score about 1.0x. The runs are deterministic on
# one machine (the loader's draws follow the seed); other CPUs may round differently.
MARGIN = 1.2


@pytest.mark.slow
# a hang guard, not a speed check: 7 min alone took over 20 on a loaded 2-core machine
@pytest.mark.timeout(3600)
def test_fine_tuned_model_follows_the_driving_poses(tmp_path):
    _results, shares = run(tmp_path)
    full = shares["full"]
    assert full > MARGIN * shares["pose-blind"], shares
    assert full > MARGIN * shares["untrained"], shares
    assert full > MARGIN * shares["full, driven by another clip"], shares
    # identity_accuracy is printed, not held: over 6 clips x 2 persons one pair moves it by
    # 0.083 and chance alone spreads it by ~0.14 (the pose-blind control scored 0.667 and the
    # full model 0.583 in one CI run, 0.5 and 0.667 in another), so it cannot rank two runs.

"""VPG: the KL penalty to the previous iterate, through the KL module."""

import numpy as np
import pytest

from .common import train

FIELDS = dict(total_steps=2048, num_envs=4, num_steps=128, lr=3e-2, policy_iters=8, vf_epochs=2)


@pytest.mark.slow
def test_kl_penalty_lowers_the_kl_to_the_previous_iterate():
    free = train("vpg", **FIELDS)
    penalized = train("vpg", kl_penalty="fixed", kl_coef=100.0, **FIELDS)
    assert np.mean(penalized.metrics["kl"]) < 0.5 * np.mean(free.metrics["kl"])
    np.testing.assert_array_equal(penalized.metrics["beta"], 100.0)


def test_adaptive_penalty_doubles_beta_when_kl_overshoots():
    out = train("vpg", kl_penalty="adaptive", kl_coef=1.0, kl_penalty_target=1e-6, **FIELDS)
    beta, kl = out.metrics["beta"][0], out.metrics["kl"][0]
    # The PPO paper's rule: beta doubles after an update whose KL exceeds 1.5 x target.
    for t in range(len(beta) - 1):
        if kl[t] > 1.5e-6:
            assert beta[t + 1] == 2 * beta[t]

"""`verify.routing.fragile_tokens`: a token is fragile exactly when one of the margins its
experts were chosen by is within what rounding moves its scores."""

import dataclasses

import numpy as np

from checkpoint.sections import MoeArgs
from verify.drift import free_sums
from verify.routing import fragile_tokens

TOP2 = MoeArgs(num_experts=4, num_experts_per_tok=2)
GROUPED = MoeArgs(
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=1,
    expert_hidden_dim=4,
    num_expert_groups=2,
    num_expert_groups_per_tok=1,
)


def test_an_expert_margin_within_twice_the_noise_is_fragile():
    truth = np.array([[4.0, 3.0, 1.0, 0.0], [4.0, 3.0, 2.9, 0.0], [4.0, 3.0, 2.9, 0.0]])
    noisy = truth + np.array([[0.01, 0, 0, 0], [0.04, 0, 0, 0], [0.06, 0, 0, 0]])
    # margins 2.0, 0.1, 0.1 between the 2nd and 3rd; noise 0.01, 0.04, 0.06
    assert fragile_tokens(truth, noisy, TOP2).tolist() == [False, False, True]


def test_group_margins_and_only_eligible_experts_count():
    # Group 0 (experts 0-3) sums its two best to 1.0, group 1 to 0.5: group 0 chosen. Expert 4
    # outscores expert 1 but is not eligible, so it makes no margin.
    clear = np.array([0.5, 0.3, 0.1, 0.0, 0.45, 0.05, 0.0, 0.0])
    assert not fragile_tokens(clear, clear + 1e-3, GROUPED).any()
    # Groups 1.0 against 0.98: a group margin of 0.02 ≤ 4 × 0.006.
    close = np.array([0.5, 0.5, 0.1, 0.0, 0.49, 0.49, 0.0, 0.0])
    assert fragile_tokens(close, close + np.eye(8)[0] * 0.006, GROUPED).all()
    assert not fragile_tokens(close, close + np.eye(8)[0] * 0.004, GROUPED).any()


def test_every_group_chosen_leaves_only_expert_margins():
    every = dataclasses.replace(GROUPED, num_expert_groups_per_tok=2)
    scores = np.array([0.5, 0.3, 0.1, 0.0, 0.45, 0.05, 0.0, 0.0])
    # Experts 0 and 4 chosen over all groups; expert 1 next: a margin of 0.15.
    assert fragile_tokens(scores, scores + 0.08, every).tolist() == [True]
    assert fragile_tokens(scores, scores + 0.07, every).tolist() == [False]


def test_free_sums_keep_nan_of_left_out_tokens_and_accept_none_left():
    truth = np.ones((3, 4), np.float32)
    port = truth.copy()
    port[2, 1] = np.nan
    states = {"R32": [truth], "P32": [truth], "R16": [truth + 0.01], "P16": [port]}
    sums = free_sums(states, rerouted=[np.array([False, False, True])])[0]
    assert sums.port16.nonfinite == 1 and sums.port16.count == 8  # token 2 left out
    sums = free_sums(states, rerouted=[np.ones(3, bool)])[0]
    assert sums.port16.nonfinite == 1 and sums.port16.count == 0

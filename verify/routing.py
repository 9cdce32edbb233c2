"""Which tokens a router could send elsewhere on rounding alone.

A MoE block routes each token to its top-k experts (fine-grained: within the top groups,
groups ranked by the sum of their two best scores). When two candidates score within the
reference's own bf16 noise of each other, any bf16 implementation may pick either: the token
then runs through other experts and its hidden state leaves the others' by far more than
rounding. Such a token says nothing about the port's arithmetic, in whichever model it
re-routes, so the free-running bf16 comparison leaves it out from that block on (the router
piece judges the choice itself, tie-aware: `verify.metrics.MismatchSums`).

A token is fragile when some margin its selection rests on is within what its scores can move:
`noise` is the largest difference between the reference's bf16 and fp32 scores at that token
(free-running, so it includes the drift that reached the router). An expert margin (the last
chosen against the best eligible unchosen) may close by 2·noise, a group margin (sums of two
scores) by 4·noise.
"""

import numpy as np

from checkpoint.sections import MoeArgs


def fragile_tokens(truth: np.ndarray, noisy: np.ndarray, moe: MoeArgs) -> np.ndarray:
    """Per token (rows of the (tokens, experts) scores): whether rounding could change its
    experts. `truth`: the fp32 reference's scores, `noisy`: its bf16 run's."""
    truth, noisy = np.asarray(truth, np.float64), np.asarray(noisy, np.float64)
    truth, noisy = truth.reshape(-1, truth.shape[-1]), noisy.reshape(-1, noisy.shape[-1])
    noise = np.abs(noisy - truth).max(-1)
    groups = moe.num_expert_groups or 1
    eligible = np.ones_like(truth, dtype=bool)
    fragile = np.zeros(len(truth), dtype=bool)
    if groups > 1 and moe.num_expert_groups_per_tok < groups:  # else every group is chosen
        grouped = truth.reshape(len(truth), groups, -1)
        group_scores = np.sort(grouped, -1)[..., -2:].sum(-1)
        ranked = np.sort(group_scores, -1)[:, ::-1]
        chosen = moe.num_expert_groups_per_tok
        fragile |= ranked[:, chosen - 1] - ranked[:, chosen] <= 4 * noise
        threshold = ranked[:, chosen - 1 : chosen]
        eligible = np.repeat(group_scores >= threshold, truth.shape[-1] // groups, axis=-1)
    candidates = np.sort(np.where(eligible, truth, -np.inf), -1)[:, ::-1]
    k = moe.num_experts_per_tok
    if candidates.shape[-1] > k:
        fragile |= candidates[:, k - 1] - candidates[:, k] <= 2 * noise
    return fragile

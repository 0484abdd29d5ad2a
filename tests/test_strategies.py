"""Judge-reward strategies against rewards computed by hand (rrm_jax/rl/strategies.py)."""

import math

import numpy as np
import pytest

from rrm_jax.errors import UserError
from rrm_jax.rl import strategies
from rrm_jax.rrm import rank


def scripted(preferences, calls=None):
    """compare() from a table {(g, i, j): winner or None}, missing keys by the lower index of
    `preferences["order"][g]` (a ranking: earlier wins); records each call's batch."""

    def compare(batch):
        if calls is not None:
            calls.append(list(batch))
        out = []
        for g, i, j in batch:
            key = (g, i, j)
            if key in preferences:
                out.append(preferences[key])
            elif (g, j, i) in preferences:
                out.append(preferences[(g, j, i)])
            else:
                order = preferences["order"][g] + [strategies.REFERENCE]  # the reference ranks last
                out.append(i if order.index(i) < order.index(j) else j)
        return out

    return compare


def test_round_robin_win_rates_with_a_tie():
    # group 0 of 3: 0 beats 1, 1 beats 2, 0 vs 2 a tie
    compare = scripted({(0, 0, 1): 0, (0, 1, 2): 1, (0, 0, 2): None})
    rewards = strategies.group_rewards("round_robin", 1, 3, compare)
    np.testing.assert_allclose(rewards, [[(1 + 0.5) / 2, (0 + 1) / 2, (0.5 + 0) / 2]])


def test_round_robin_two_groups_in_one_call():
    calls = []
    compare = scripted({"order": [[2, 0, 1, 3], [3, 2, 1, 0]]}, calls)
    rewards = strategies.group_rewards("round_robin", 2, 4, compare)
    assert len(calls) == 1 and len(calls[0]) == 2 * 6
    np.testing.assert_allclose(rewards, [[2 / 3, 1 / 3, 1, 0], [0, 1 / 3, 2 / 3, 1]])


def test_elo_zscores_from_official_constants():
    compare = scripted({(0, 0, 1): 0, (0, 1, 2): None, (0, 0, 2): 2})
    rewards = strategies.group_rewards("elo", 1, 3, compare, seed=5)
    # by hand: the same seeded order, ELO K=4 from 1000, then z-scores
    ratings = [1000.0] * 3
    outcome = {(0, 1): 1.0, (1, 2): 0.5, (0, 2): 0.0}
    for i, j in rank.round_robin_order(3, 5):
        e_i = 1 / (1 + 10 ** ((ratings[j] - ratings[i]) / 400))
        s = outcome[(i, j)]
        ratings[i], ratings[j] = ratings[i] + 4 * (s - e_i), ratings[j] + 4 * ((1 - s) - (1 - e_i))
    r = np.array(ratings)
    np.testing.assert_allclose(rewards[0], (r - r.mean()) / r.std(), rtol=1e-5)


def test_elo_all_ties_gives_zero():
    rewards = strategies.group_rewards("elo", 1, 4, lambda batch: [None] * len(batch))
    np.testing.assert_array_equal(rewards, np.zeros((1, 4)))


def test_knockout_rounds_and_byes_for_g_not_a_power_of_two():
    calls = []
    G = 5  # 8 slots: 3 byes, 1 first-round match, then 2 rounds
    order = [4, 1, 3, 0, 2]  # 4 is best
    compare = scripted({"order": [order]}, calls)
    rewards = strategies.group_rewards("knockout", 1, G, compare, seed=3)
    assert len(calls) == strategies.rounds("knockout", G) == 3
    assert sum(map(len, calls)) == G - 1
    bracket = rank.seeded_bracket(G, 3)
    byes = [e[0] for e in bracket if len(e) == 1]
    assert len(byes) == 3
    # by hand: replay the bracket with the ranking
    won = {c: 0 for c in range(G)}
    for c in byes:
        won[c] += 1
    entries = bracket
    while len(entries) > 1 or len(entries[0]) > 1:
        advancing = []
        for e in entries:
            if len(e) == 1:
                advancing.append(e[0])
            else:
                w = min(e, key=order.index)
                won[w] += 1
                advancing.append(w)
        entries = [tuple(advancing[p : p + 2]) for p in range(0, len(advancing), 2)]
    np.testing.assert_allclose(rewards[0], [won[c] / 3 for c in range(G)])
    assert rewards[0][4] == 1.0  # the best sample wins every round it plays


def test_knockout_tie_advances_the_first_of_the_pair():
    rewards = strategies.group_rewards("knockout", 1, 2, lambda batch: [None] * len(batch), seed=0)
    first = rank.seeded_bracket(2, 0)[0][0]
    expected = np.zeros(2)
    expected[first] = 1.0
    np.testing.assert_allclose(rewards[0], expected)


def test_circular_two_comparisons_each():
    # G = 3: (0,1), (1,2), (2,0); 0 beats 1, 1 vs 2 tie, 2 beats 0
    compare = scripted({(0, 0, 1): 0, (0, 1, 2): None, (0, 2, 0): 2})
    rewards = strategies.group_rewards("circular", 1, 3, compare)
    np.testing.assert_allclose(rewards, [[(1 + 0) / 2, (0 + 0.5) / 2, (0.5 + 1) / 2]])


def test_reference_plus_minus_one_and_tie():
    compare = scripted(
        {
            (0, 0, strategies.REFERENCE): 0,
            (0, 1, strategies.REFERENCE): strategies.REFERENCE,
            (0, 2, strategies.REFERENCE): None,
        }
    )
    rewards = strategies.group_rewards("reference", 1, 3, compare)
    np.testing.assert_array_equal(rewards, [[1, -1, 0]])


def test_reference_works_with_one_sample():
    rewards = strategies.group_rewards("reference", 2, 1, lambda batch: [i for _, i, _ in batch])
    np.testing.assert_array_equal(rewards, [[1], [1]])


@pytest.mark.parametrize("strategy", strategies.PAIRWISE)
def test_pairwise_strategies_refuse_a_group_of_one(strategy):
    with pytest.raises(UserError, match="samples_per_prompt must be >= 2"):
        strategies.check_strategy(strategy, 1)


def test_unknown_strategy():
    with pytest.raises(UserError, match="round_robin, elo, knockout, circular, reference"):
        strategies.check_strategy("swiss", 4)


@pytest.mark.parametrize("G", [2, 3, 4, 5, 8])
def test_calls_per_step_equal_the_rounds(G):
    for strategy in strategies.STRATEGIES:
        calls = []
        strategies.group_rewards(strategy, 3, G, scripted({"order": [list(range(G))] * 3}, calls))
        assert len(calls) == strategies.rounds(strategy, G)
        assert strategies.rounds(strategy, G) == (math.ceil(math.log2(G)) if strategy == "knockout" else 1)

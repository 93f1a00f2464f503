import math

import numpy as np
import pytest

from ldm.evaluation.preference import bradley_terry, rate_with_intervals, win_probability

TRUTH = {"a": 1200.0, "b": 1100.0, "c": 1000.0, "d": 900.0, "e": 800.0}  # mean 1000, as the fit is anchored


def synthetic_votes(count, seed, truth=TRUTH):
    """(winner, loser) votes between random pairs, each won with the Bradley–Terry probability of the truth."""
    rng = np.random.default_rng(seed)
    names = list(truth)
    votes = []
    for _ in range(count):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        votes.append((a, b) if rng.random() < win_probability(truth[a], truth[b]) else (b, a))
    return votes


def test_the_fit_recovers_the_order_and_the_gaps_of_known_strengths():
    ratings = bradley_terry(synthetic_votes(5000, seed=0))
    assert sorted(ratings, key=ratings.get, reverse=True) == ["a", "b", "c", "d", "e"]
    assert np.mean(list(ratings.values())) == pytest.approx(1000)
    for name, true in TRUTH.items():  # the standard error at 2000 games a model is about 8 points
        assert ratings[name] == pytest.approx(true, abs=25)


def test_the_true_ratings_fall_inside_most_95_percent_intervals():
    covered = []
    for seed in range(12):
        result = rate_with_intervals(synthetic_votes(400, seed=100 + seed), rounds=200, seed=seed)
        covered += [result.lower[name] <= true <= result.upper[name] for name, true in TRUTH.items()]
    assert np.mean(covered) >= 0.85  # nominal 0.95; the one-vote-per-pair prior and the percentile method cost a bit


def test_intervals_shrink_with_more_votes():
    few = rate_with_intervals(synthetic_votes(200, seed=1), rounds=200)
    many = rate_with_intervals(synthetic_votes(3200, seed=1), rounds=200)
    width = {n: np.mean([r.upper[m] - r.lower[m] for m in TRUTH]) for n, r in (("few", few), ("many", many))}
    assert width["many"] < width["few"] / 2  # ~1/√16 = 1/4 in theory
    assert many.votes == 3200 and sum(many.games.values()) == 2 * 3200


def test_the_bootstrap_is_seeded():
    votes = synthetic_votes(300, seed=2)
    assert rate_with_intervals(votes, rounds=50, seed=4) == rate_with_intervals(votes, rounds=50, seed=4)
    assert rate_with_intervals(votes, rounds=50, seed=4).lower != rate_with_intervals(votes, rounds=50, seed=5).lower


def test_the_prior_keeps_a_model_that_never_wins_finite():
    """5 wins of a over b plus one virtual tie: a scores 5.5 of 6, odds 11:1, a gap of 400·log10 11."""
    ratings = bradley_terry([("a", "b")] * 5)
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(11))
    unbeaten = bradley_terry([("a", "b")] * 20 + [("b", "c"), ("c", "b")] * 5)  # a never loses, c never meets a
    assert all(math.isfinite(r) for r in unbeaten.values())
    assert max(unbeaten, key=unbeaten.get) == "a"


def test_a_tie_is_half_a_win_for_each_side():
    assert bradley_terry([], ties=[("a", "b")] * 10) == pytest.approx({"a": 1000, "b": 1000})
    # 1 win + 3 ties for a against 3 ties for b, without a prior: 2.5 to 1.5
    ratings = bradley_terry([("a", "b")], ties=[("a", "b")] * 3, prior_ties=0)
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(2.5 / 1.5))


def test_a_model_given_but_never_voted_on_rates_at_the_anchor_of_the_others():
    ratings = bradley_terry([("a", "b")] * 3 + [("b", "a")] * 3, models=["a", "b", "c"])
    assert ratings == pytest.approx({"a": 1000, "b": 1000, "c": 1000})


@pytest.mark.parametrize("call, message", [
    (lambda: bradley_terry([]), "there are no votes"),
    (lambda: bradley_terry([("a", "a")]), "vote 0 has 'a' on both sides"),
    (lambda: bradley_terry([("a", "b")], models=["a", "c"]), r"the votes name models \['b'\] that are not among"),
    (lambda: bradley_terry([], ties=[("a", "b")], models=["a", "b", "a"]), "name a model twice"),
    (lambda: bradley_terry([("a", "b")], prior_ties=-1), "prior_ties -1 must be a finite number ≥ 0"),
    (lambda: bradley_terry([("a", "b")] * 3, prior_ties=0), r"infinite: \['b'\] never win, \['a'\] never lose"),
    (lambda: bradley_terry([("a", "b"), ("b", "a"), ("c", "d"), ("d", "c")], prior_ties=0),
     "one group of models never beats another"),
    (lambda: rate_with_intervals([("a", "b")], rounds=0), "rounds 0 must be a positive integer"),
    (lambda: rate_with_intervals([("a", "b")], confidence=1.5), "confidence 1.5 must lie strictly between 0 and 1"),
])
def test_bad_votes_fail_with_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_fewer_than_two_models_is_refused():
    for models in (["a"], [], ["a", "a"]):
        with pytest.raises(ValueError, match="ratings need at least 2 models; models names only"):
            bradley_terry([("a", "b")], models=models)

"""Ratings from pairwise votes (a human side-by-side arena): the Bradley–Terry model, with bootstrap intervals.

Bradley & Terry (1952): P(i beats j) = p_i / (p_i + p_j). With θ = ln p the log-likelihood of the votes is
concave, and Newton's method on it converges in a handful of steps (Hunter 2004, "MM algorithms for generalized
Bradley–Terry models", §1, gives the likelihood and the MM alternative, which is slower). A tie counts as half a
win for each side, as in Chatbot Arena's ratings.

Scale: rating = 400·log10 p + 1000, anchored so that the mean rating over the models is 1000. Then, as with Elo,
a 400-point gap means 10:1 odds and P(i beats j) = 1 / (1 + 10^((R_j − R_i)/400)) (`win_probability`). Only
differences are identified by votes; the anchor makes ratings fitted on different vote sets comparable only if
the sets rate the same models.

The prior: the maximum-likelihood strengths do not exist when a model never wins (its rating goes to −∞), never
loses (+∞), or when the models split into groups one of which never beats the other (Zermelo 1929; Hunter 2004,
Assumption 1) — all common in a young arena and in bootstrap resamples. So by default every pair of models
gets `prior_ties` = 1 virtual tie: a weak pull towards equal ratings, worth one vote per pair, which keeps every
rating finite and fades as real votes accumulate (a few hundred are needed anyway to tell 60/40 from 50/50).
With prior_ties=0 the plain maximum-likelihood fit is used, and data without a finite one is refused.

Intervals: the votes are resampled with replacement (`rounds` times, from a seeded numpy generator), refitted,
and each model's percentile interval is read off (Efron & Tibshirani 1993, §13.3), as Chatbot Arena does.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import numpy as np

ANCHOR = 1000.0  # the mean rating
SCALE = 400.0  # rating points per factor of 10 in strength, as Elo
TOLERANCE = 1e-10  # on θ, in nats
MAX_STEPS = 100


class Ratings(NamedTuple):
    rating: dict[str, float]  # fitted on all votes; mean 1000
    lower: dict[str, float]  # the bootstrap percentile interval
    upper: dict[str, float]
    games: dict[str, int]  # real votes (wins, losses and ties) each model took part in
    votes: int
    rounds: int
    confidence: float


def win_probability(rating: float, opponent: float) -> float:
    """P(a model rated `rating` beats one rated `opponent`) under the fitted model."""
    return 1 / (1 + 10 ** ((opponent - rating) / SCALE))


def bradley_terry(votes: Iterable[tuple[str, str]], ties: Iterable[tuple[str, str]] = (),
                  models: Sequence[str] | None = None, prior_ties: float = 1.0) -> dict[str, float]:
    """Ratings (mean 1000) from `votes` as (winner, loser) and `ties` as (a, b) pairs of model names.
    `models` fixes the models rated (default: every name in the votes, sorted)."""
    prior_ties = check_prior(prior_ties)
    names, first, second, score = encode_votes(votes, ties, models)
    check_finite_fit(first, second, score, names, prior_ties)
    theta = fit_log_strengths(first, second, score, len(names), prior_ties)
    return dict(zip(names, to_ratings(theta).tolist()))


def rate_with_intervals(votes: Iterable[tuple[str, str]], ties: Iterable[tuple[str, str]] = (),
                        models: Sequence[str] | None = None, prior_ties: float = 1.0, rounds: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> Ratings:
    """`bradley_terry` ratings with bootstrap percentile intervals at `confidence`."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds {rounds!r} must be a positive integer (a few hundred to 1000 give stable intervals)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence!r} must lie strictly between 0 and 1, e.g. 0.95")
    prior_ties = check_prior(prior_ties)
    names, first, second, score = encode_votes(votes, ties, models)
    check_finite_fit(first, second, score, names, prior_ties)
    rating = to_ratings(fit_log_strengths(first, second, score, len(names), prior_ties))
    generator = np.random.default_rng(seed)
    resampled = np.empty((rounds, len(names)))
    for r in range(rounds):
        pick = generator.integers(0, len(score), len(score))
        resampled[r] = to_ratings(fit_log_strengths(first[pick], second[pick], score[pick], len(names), prior_ties))
    lower, upper = np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    games = np.bincount(first, minlength=len(names)) + np.bincount(second, minlength=len(names))
    return Ratings(rating=dict(zip(names, rating.tolist())), lower=dict(zip(names, lower.tolist())),
                   upper=dict(zip(names, upper.tolist())), games=dict(zip(names, games.tolist())),
                   votes=len(score), rounds=rounds, confidence=confidence)


def encode_votes(votes: Iterable[tuple[str, str]], ties: Iterable[tuple[str, str]],
                 models: Sequence[str] | None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(model names, first side's index, second side's index, first side's score: 1 a win, 0.5 a tie)."""
    if models is not None and len(set(models)) < 2:
        raise ValueError(f"ratings need at least 2 models; models names only {sorted(set(models))}")
    pairs = [(*pair, 1.0) for pair in votes] + [(*pair, 0.5) for pair in ties]
    if not pairs:
        raise ValueError("there are no votes: ratings need at least one (winner, loser) vote or tie")
    for number, (a, b, _) in enumerate(pairs):
        if a == b:
            raise ValueError(f"vote {number} has {a!r} on both sides: a vote compares two different models")
    seen = sorted({name for a, b, _ in pairs for name in (a, b)})
    names = seen if models is None else list(models)
    if len(set(names)) != len(names):
        raise ValueError(f"models {names} name a model twice")
    unknown = sorted(set(seen) - set(names))
    if unknown:
        raise ValueError(f"the votes name models {unknown} that are not among the models {names}")
    index = {name: i for i, name in enumerate(names)}
    first = np.array([index[a] for a, _, _ in pairs])
    second = np.array([index[b] for _, b, _ in pairs])
    return names, first, second, np.array([s for _, _, s in pairs])


def check_prior(prior_ties: float) -> float:
    if not (isinstance(prior_ties, (int, float)) and math.isfinite(prior_ties) and prior_ties >= 0):
        raise ValueError(f"prior_ties {prior_ties!r} must be a finite number ≥ 0 (1 is one virtual tie per pair)")
    return float(prior_ties)


def score_matrix(first: np.ndarray, second: np.ndarray, score: np.ndarray, count: int,
                 prior_ties: float) -> np.ndarray:
    """W[i, j]: i's score against j (wins + half the ties), with each pair's virtual ties added."""
    wins = np.full((count, count), prior_ties / 2)
    np.fill_diagonal(wins, 0.0)
    np.add.at(wins, (first, second), score)
    np.add.at(wins, (second, first), 1 - score)
    return wins


def fit_log_strengths(first: np.ndarray, second: np.ndarray, score: np.ndarray, count: int,
                      prior_ties: float) -> np.ndarray:
    """θ = ln p maximising the Bradley–Terry log-likelihood, centred at mean 0, by Newton's method with
    step halving (the log-likelihood is concave; its Hessian is singular only along θ + c, which the
    centring removes)."""
    wins = score_matrix(first, second, score, count, prior_ties)
    games = wins + wins.T
    theta = np.zeros(count)
    for _ in range(MAX_STEPS):
        p = 0.5 * (1 + np.tanh((theta[:, None] - theta[None, :]) / 2))  # σ(θ_i − θ_j), stable
        gradient = wins.sum(axis=1) - (games * p).sum(axis=1)
        curvature = games * p * (1 - p)
        hessian = np.diag(curvature.sum(axis=1)) - curvature  # −∇²ℓ: positive semidefinite, null space 1
        step = np.linalg.solve(hessian + 1.0, gradient)  # + 11ᵀ makes it definite and keeps Σ step = 0
        start, size = log_likelihood(theta, wins), 1.0
        while log_likelihood(theta + size * step, wins) < start and size > 1e-8:
            size /= 2
        theta = theta + size * step
        if np.abs(size * step).max() < TOLERANCE:
            return theta - theta.mean()
    raise RuntimeError(f"the Bradley–Terry fit did not converge in {MAX_STEPS} Newton steps "
                       f"(last step {np.abs(size * step).max():.3g}); try prior_ties > 0")


def log_likelihood(theta: np.ndarray, wins: np.ndarray) -> float:
    """Σ_ij W_ij·ln σ(θ_i − θ_j)."""
    difference = theta[:, None] - theta[None, :]
    return float((wins * -np.logaddexp(0.0, -difference)).sum())


def check_finite_fit(first: np.ndarray, second: np.ndarray, score: np.ndarray, names: list[str],
                     prior_ties: float) -> None:
    """Without a prior the fit is finite only if every model reaches every other along "beat or tied" edges
    (Hunter 2004, Assumption 1); name the models that break it. Any prior > 0 joins every pair."""
    if prior_ties > 0:
        return
    beats = score_matrix(first, second, score, len(names), 0.0) > 0
    never_win = [names[i] for i in np.flatnonzero(~beats.any(axis=1))]
    never_lose = [names[i] for i in np.flatnonzero(~beats.any(axis=0))]
    reach = beats | np.eye(len(names), dtype=bool)
    for _ in range(len(names).bit_length()):  # squaring: paths of length 2, 4, 8, ... ≥ the number of models
        reach = reach | ((reach.astype(int) @ reach.astype(int)) > 0)
    if never_win or never_lose or not reach.all():
        detail = (f"{never_win} never win, {never_lose} never lose" if never_win or never_lose
                  else "one group of models never beats another")
        raise ValueError(f"with prior_ties=0 the ratings are infinite: {detail}; use prior_ties > 0 "
                         "(default 1, one virtual tie per pair)")


def to_ratings(theta: np.ndarray) -> np.ndarray:
    """ln p → 400·log10 p + 1000, with the mean rating at 1000."""
    return SCALE * (theta - theta.mean()) / math.log(10) + ANCHOR

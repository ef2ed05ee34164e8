"""Segment names and descriptions, from each centroid's position against the population."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.ml.preprocess import FEATURES

if TYPE_CHECKING:
    from app.ml.schema import FeatureSchema

_INCOME, _SPENDING, _FREQUENCY, _AGE = (
    FEATURES.index(name) for name in ("annual_income", "spending_score", "purchase_frequency", "age")
)
_NOTABLE_Z = 0.5  # a centroid this many standard deviations off the mean is "high"/"low"
_AGE_Z = 0.75


def _level(z: float, high: str, low: str, middle: str) -> str:
    if z >= _NOTABLE_Z:
        return high
    if z <= -_NOTABLE_Z:
        return low
    return middle


def _age_word(z: float, age: float) -> str | None:
    if z <= -_AGE_Z:
        return "young" if age < 40 else "younger"
    if z >= _AGE_Z:
        return "senior" if age >= 60 else "older"
    return None


def _frequency_word(z: float) -> str:
    return _level(z, "frequent buyers", "occasional buyers", "regular buyers")


def _relative(z: float) -> str:
    if z >= 1.0:
        return "far above"
    if z >= _NOTABLE_Z:
        return "above"
    if z <= -1.0:
        return "far below"
    if z <= -_NOTABLE_Z:
        return "below"
    return "near"


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def segment_names(z: np.ndarray, centers: np.ndarray) -> list[str]:
    """Marketer's names for centroids, unique within the model.

    ``z`` holds each centroid's z-scores against the whole population and
    ``centers`` its values in original units (both (k, 4) in FEATURES order).
    A name states income and spending, adds age when notably young or old and
    purchase frequency when it stands out by a full standard deviation.
    Colliding names first get purchase frequency, then age band, when that
    tells them apart; then, on the feature where the colliding centroids
    spread most, the lowest and highest are marked ("older", "bigger
    spenders"...); a number is the last resort. Deterministic throughout.
    """
    parts: list[list[str]] = []
    for zc, center in zip(z, centers, strict=True):
        words = []
        age = _age_word(zc[_AGE], center[_AGE])
        if age:
            words.append(age)
        words.append(_level(zc[_INCOME], "high income", "low income", "average income"))
        words.append(_level(zc[_SPENDING], "high spending", "low spending", "moderate spending"))
        if abs(zc[_FREQUENCY]) >= 1.0:
            words.append(_frequency_word(zc[_FREQUENCY]))
        parts.append(words)

    base = [_capitalize(", ".join(words)) for words in parts]
    qualifiers: list[list[str]] = [[] for _ in parts]

    def names() -> list[str]:
        return [f"{b} ({', '.join(q)})" if q else b for b, q in zip(base, qualifiers, strict=True)]

    def clashes() -> list[list[int]]:
        return _clashes(names())

    # 1. Absolute traits the base name left out, if they tell the group apart.
    for trait, front in (
        (lambda i: _frequency_word(z[i, _FREQUENCY]), False),
        (lambda i: _age_word(z[i, _AGE], centers[i, _AGE]) or "middle-aged", True),
    ):
        for group in clashes():
            words = [trait(i) for i in group]
            if len(set(words)) > 1:
                for i, word in zip(group, words, strict=True):
                    if word in parts[i]:
                        continue
                    if front:
                        parts[i].insert(0, word)
                    else:
                        parts[i].append(word)
        base = [_capitalize(", ".join(words)) for words in parts]

    # 2. Relative to each other: the lowest and highest of the group on the
    #    feature where the group spreads most.
    used: list[set[int]] = [set() for _ in parts]
    for _ in range(len(FEATURES)):
        groups = clashes()
        if not groups:
            break
        for group in groups:
            free = [j for j in range(len(FEATURES)) if not any(j in used[i] for i in group)]
            if not free:
                continue
            spread = {j: float(np.ptp(z[group, j])) for j in free}
            j = max(free, key=lambda f: (spread[f], -f))
            if spread[j] == 0.0:
                continue
            low_word, high_word = _RELATIVE_WORDS[FEATURES[j]]
            values = z[group, j]
            qualifiers[group[int(np.argmin(values))]].append(low_word)
            qualifiers[group[int(np.argmax(values))]].append(high_word)
            for i in group:
                used[i].add(j)

    # 3. Identical centroids (or nearly): number them.
    return _numbered(names())


def _clashes(names: list[str]) -> list[list[int]]:
    """Groups of positions that share a name, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _numbered(names: list[str]) -> list[str]:
    """Names still shared get a number: "X (1)", "X (2)"..."""
    counter: dict[str, int] = {}
    unique = []
    for name in names:
        if names.count(name) > 1:
            counter[name] = counter.get(name, 0) + 1
            name = f"{name} ({counter[name]})"
        unique.append(name)
    return unique


_RELATIVE_WORDS = {
    "age": ("younger", "older"),
    "annual_income": ("less affluent", "more affluent"),
    "spending_score": ("lighter spenders", "bigger spenders"),
    "purchase_frequency": ("less frequent", "more frequent"),
}


def describe_customer_segment(center: np.ndarray, zc: np.ndarray, percentage: float) -> str:
    return (
        f"{percentage:.1f}% of customers: aged {center[_AGE]:.0f} on average, earning "
        f"{center[_INCOME]:.1f}k a year ({_relative(zc[_INCOME])} average), with a spending score of "
        f"{center[_SPENDING]:.0f} ({_relative(zc[_SPENDING])} average) and "
        f"{center[_FREQUENCY]:.0f} purchases a year ({_relative(zc[_FREQUENCY])} average)."
    )


# --------------------------------------------------------------------------- #
# Declared (custom) schemas: names from the features that set a centroid apart


@dataclass(frozen=True)
class Trait:
    """One way a segment stands out: a numeric feature high or low, or a categorical level over-represented."""

    score: float
    """How far from the population, in standard deviations (z of the centroid, or of the level's share)."""
    feature: int
    words: str


def segment_traits(
    schema: FeatureSchema, z: np.ndarray, shares: list[dict[str, dict[str, float]]]
) -> list[list[Trait]]:
    """Each segment's traits, most distinguishing first (ties by feature order).

    ``z[i, j]`` is segment i's centroid on numeric feature j's standardized
    column (NaN for categoricals); ``shares[i][feature][level]`` the level's
    share within segment i. A categorical feature offers its one most
    over-represented level.
    """
    traits: list[list[Trait]] = []
    for i in range(len(z)):
        found = []
        for j, feature in enumerate(schema.features):
            if feature.numeric:
                found.append(Trait(abs(float(z[i, j])), j, f"{'High' if z[i, j] > 0 else 'Low'} {feature.name}"))
                continue
            best: Trait | None = None
            for level, p in zip(feature.levels_ or (), feature.shares_ or (), strict=True):
                if not 0 < p < 1:
                    continue
                score = (shares[i][feature.name].get(level, 0.0) - p) / math.sqrt(p * (1 - p))
                if score > 0 and (best is None or score > best.score):
                    best = Trait(score, j, f"{feature.name}: {level}")
            if best is not None:
                found.append(best)
        found.sort(key=lambda t: (-t.score, t.feature))
        traits.append(found)
    return traits


def custom_segment_names(traits: list[list[Trait]]) -> list[str]:
    """Names from the one or two most distinguishing traits, unique within the model.

    Colliding names take each member's next trait in turn; a number is the
    last resort. Deterministic throughout.
    """
    taken = []
    for found in traits:
        notable = [t for t in found if t.score >= _NOTABLE_Z][:2]
        taken.append(len(notable))

    def names() -> list[str]:
        return [
            ", ".join(t.words for t in found[:count]) or "Close to average"
            for found, count in zip(traits, taken, strict=True)
        ]

    while True:
        clashes = _clashes(names())
        grown = False
        for group in clashes:
            for i in group:
                if taken[i] < len(traits[i]):
                    taken[i] += 1
                    grown = True
        if not clashes or not grown:
            break

    return _numbered(names())


def describe_custom_segment(
    schema: FeatureSchema, traits: list[Trait], means: dict[str, Any], z: np.ndarray, percentage: float
) -> str:
    """One sentence: the segment's share and its three most distinguishing features."""
    parts = []
    for trait in traits[:3]:
        feature = schema.features[trait.feature]
        if feature.numeric:
            parts.append(f"{feature.name} {means[feature.name]:.4g} ({_relative(float(z[trait.feature]))} average)")
        else:
            level = trait.words.split(": ", 1)[1]
            overall = dict(zip(feature.levels_ or (), feature.shares_ or (), strict=True))[level]
            parts.append(f"{means[feature.name][level]:.0%} {feature.name} {level} (vs {overall:.0%} overall)")
    detail = ", ".join(parts) if parts else "close to the average on every feature"
    return f"{percentage:.1f}% of customers: {detail}."

"""The one K-Means whose centroids are set rather than fitted: the served ids' order.

Training orders its clusters (by income, or by size), a new version takes the previous one's ids
(app.ml.matching), the out-of-core and Spark trainers find their centroids without scikit-learn.
Either way the saved ``kmeans.pkl`` must be a plain scikit-learn estimator whose own ``predict``
returns the served id: centroid ``i`` is cluster ``i``. :func:`kmeans_with_centers` is the only
code that writes a fitted scikit-learn estimator's attributes; everything else fits or reads them.
"""

from __future__ import annotations

import copy

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans


def kmeans_with_centers(
    centers: np.ndarray,
    *,
    like: KMeans | MiniBatchKMeans | None = None,
    inertia: float | None = None,
    random_state: int = 0,
) -> KMeans | MiniBatchKMeans:
    """A fitted K-Means whose ``predict`` is the nearest of ``centers`` (row ``i`` is cluster ``i``).

    ``like`` is the fitted estimator the centroids came from (reordered or refined): the result is a
    copy of it, ``like`` itself is left as it was. Without one (centroids found by another engine)
    a KMeans is fitted on the centroids themselves, which gives every fitted attribute scikit-learn
    expects. Either way ``cluster_centers_`` are then exactly ``centers`` (a fit would move them by
    rounding), ``inertia_`` is ``inertia`` when given, and no ``labels_`` are kept: they would be
    the training rows' old ids, and a 1M-row model would carry 4 MB of them into every version.
    """
    centers = np.asarray(centers)
    if like is None:
        init = np.ascontiguousarray(centers, dtype=np.float64)
        like = KMeans(n_clusters=len(init), init=init, n_init=1, max_iter=1, random_state=random_state).fit(init)
    kmeans = copy.copy(like)
    kmeans.cluster_centers_ = centers
    if inertia is not None:
        kmeans.inertia_ = float(inertia)
    vars(kmeans).pop("labels_", None)
    return kmeans


__all__ = ["kmeans_with_centers"]

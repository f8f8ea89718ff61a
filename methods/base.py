"""The method contract.

A method declares its config nodes (one dataclass per stage, named after the
stage: `byol`, `conr`, `simclr`, `scan` ...) and implements `run`, which
returns predictions for the evaluation split.  The harness, never the method,
computes the metrics from those predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bench.data import DataBundle
    from bench.runner import RunContext


@dataclass
class Prediction:
    labels: np.ndarray  # (n_eval,) predicted cluster of each evaluation image
    features: np.ndarray | None = None  # (n_eval, d) features that were clustered, where the method has them
    probs: np.ndarray | None = None  # (n_eval, K) cluster probabilities (head methods)
    stage_labels: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. {"scan": ..., "selflabel": ...}
    extra: dict[str, Any] = field(default_factory=dict)  # anything worth keeping in the record


class Method:
    name: str = ""
    #: "feature" methods are scored by k-means on their features; "head" methods by argmax of a head.
    kind: str = "feature"
    #: ordered stage names; each has a config node of the same name (except pure evaluation stages)
    stages: tuple[str, ...] = ()

    @classmethod
    def config_nodes(cls) -> dict[str, type]:
        return {}

    @classmethod
    def validate(cls, cfg) -> None:
        """Raise bench.errors.ConfigError for out-of-range values."""

    def run(self, data: DataBundle, ctx: RunContext) -> Prediction:
        raise NotImplementedError

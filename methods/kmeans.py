"""k-means on the raw pixels: the reference row every table can carry.

Pixels are scaled to [0, 1] and flattened; no learning.  (Set
eval.spherical=true for cosine k-means on L2-normalised pixels instead.)
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.base import Method, Prediction


@dataclass
class KMeansConfig:
    spherical: bool = False  # raw k-means on [0, 1] pixels (the classic baseline)


class KMeansMethod(Method):
    name = "kmeans"
    kind = "feature"
    stages = ("kmeans",)

    @classmethod
    def config_nodes(cls):
        return {"kmeans": KMeansConfig}

    @classmethod
    def validate(cls, cfg) -> None:
        from bench.errors import ConfigError

        if cfg.dataset.num_classes < 1:
            raise ConfigError("kmeans needs dataset.num_classes >= 1")

    def run(self, data, ctx) -> Prediction:
        from bench.cluster import kmeans

        x = data.eval.images.reshape(len(data.eval), -1).float().div_(255.0).numpy()
        if data.num_classes > len(x):
            from bench.errors import ConfigError

            raise ConfigError(f"K={data.num_classes} clusters but only {len(x)} images to cluster")
        ctx.log(f"k-means on raw pixels: {x.shape[0]} x {x.shape[1]}, K={data.num_classes}, "
                f"{ctx.cfg.eval.kmeans_restarts} restarts")
        res = kmeans(x, data.num_classes, restarts=ctx.cfg.eval.kmeans_restarts, iters=ctx.cfg.eval.kmeans_iters,
                     spherical=bool(ctx.cfg.kmeans.spherical), seed=ctx.seed)
        return Prediction(labels=res.labels, extra={"inertia": res.inertia})

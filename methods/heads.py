"""Cluster heads and the losses of SCAN and NNM, as pure functions.

- ClusterModel: a backbone and several linear cluster heads (logits of shape (H, N, K)).
- scan_loss: -mean log <p(x), p(n)> - w x entropy(mean p(x)), n a mined neighbour of x.
- selflabel_loss: cross-entropy on the strong view against the weak view's argmax,
  only where the weak view's max probability exceeds the threshold, classes weighted
  by the inverse of their frequency among the confident samples.
- NNM: batch_nearest_neighbour (never the sample itself), cluster_level_loss
  (columns of the batch probability matrices against the identity), nnm_loss.
- Head selection: head_losses (the SCAN objective of every head over the whole
  training set) and select_head (the lowest); neither takes labels.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-8


class ClusterModel(nn.Module):
    """backbone -> features (N, d) -> `num_heads` linear heads -> logits (H, N, K)."""

    def __init__(self, backbone: nn.Module, num_classes: int, num_heads: int = 1):
        super().__init__()
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.heads = nn.ModuleList([nn.Linear(backbone.feat_dim, num_classes) for _ in range(num_heads)])

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, x: torch.Tensor, with_features: bool = False):
        h = self.backbone(x)
        logits = torch.stack([head(h) for head in self.heads])
        return (logits, h) if with_features else logits

    def keep_head(self, index: int) -> ClusterModel:
        """A one-head model: a copy of the backbone and of head `index`."""
        out = ClusterModel(copy.deepcopy(self.backbone), self.num_classes, 1)
        out.heads[0].load_state_dict(self.heads[index].state_dict())
        return out.to(next(self.parameters()).device)


# --------------------------------------------------------------------------- SCAN


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """-sum p log p along `dim` (natural log; 0 log 0 = 0)."""
    return -(p * torch.log(p.clamp(min=EPS))).sum(dim)


def consistency_loss(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """-mean_i log <p_i, q_i> for probability rows p, q of shape (N, K)."""
    return -torch.log((p * q).sum(-1).clamp(min=EPS)).mean()


def scan_loss(anchor_logits: torch.Tensor, neighbour_logits: torch.Tensor, entropy_weight: float = 5.0):
    """SCAN's objective for one head: (total, consistency, entropy).

    total = consistency - entropy_weight x entropy(batch-mean of the anchors' probabilities),
    so a larger entropy (clusters used evenly) lowers the loss.
    """
    p = F.softmax(anchor_logits.float(), dim=-1)
    q = F.softmax(neighbour_logits.float(), dim=-1)
    cons = consistency_loss(p, q)
    ent = entropy(p.mean(0))
    return cons - entropy_weight * ent, cons, ent


# --------------------------------------------------------------------------- self-labelling


def confidence_mask(probs: torch.Tensor, threshold: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): samples whose max probability is strictly above threshold, and their argmax."""
    conf, targets = probs.max(dim=-1)
    return conf > threshold, targets


def class_balance_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class weights n / count_c over the given targets (1 for classes that do not occur)."""
    counts = torch.bincount(targets, minlength=num_classes).float()
    w = torch.ones(num_classes, device=targets.device)
    present = counts > 0
    w[present] = targets.numel() / counts[present]
    return w


def selflabel_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float = 0.99,
                   balance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, number of confident samples as a 0-d tensor): cross-entropy of the strong view against the
    confident weak-view predictions, weighted by n / count per class when balance is on.

    Written with masks rather than boolean indexing, so the step never waits for the device to learn how many
    samples are confident.  No confident sample: a zero loss that still has a graph.
    """
    with torch.no_grad():
        mask, targets = confidence_mask(F.softmax(weak_logits.float(), dim=-1), threshold)
        m = mask.to(torch.float32 if strong_logits.dtype != torch.float64 else torch.float64)
        n = m.sum()
        if balance:
            k = strong_logits.shape[-1]
            counts = torch.zeros(k, dtype=m.dtype, device=m.device).scatter_add_(0, targets, m)
            w = torch.where(counts > 0, n / counts.clamp(min=1), torch.ones_like(counts))
            weight = m * w[targets]
        else:
            weight = m
    ce = F.cross_entropy(strong_logits.float() if strong_logits.dtype != torch.float64 else strong_logits,
                         targets, reduction="none")
    return (weight * ce).sum() / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny), n


# --------------------------------------------------------------------------- NNM


def batch_nearest_neighbour(queries: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """For each row i, the index j != i of the most cosine-similar key (never the sample itself).

    queries and keys are two views of the same batch, row for row (keys=None: the queries themselves).
    """
    q = F.normalize(queries.float(), dim=-1)
    k = q if keys is None else F.normalize(keys.float(), dim=-1)
    s = q @ k.T
    s.fill_diagonal_(float("-inf"))
    return s.argmax(dim=1)


def cluster_level_loss(p: torch.Tensor, q: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cluster-level matching of two batch probability matrices (N, K).

    Column k of p and of q (L2-normalised) describe cluster k over the batch; the K x K
    similarity matrix / temperature is scored by cross-entropy against the identity,
    row-wise and column-wise (averaged).
    """
    a = F.normalize(p.float().T, dim=1)
    b = F.normalize(q.float().T, dim=1)
    logits = a @ b.T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def nnm_loss(anchor: torch.Tensor, augmented: torch.Tensor, neighbour: torch.Tensor, global_nn: torch.Tensor,
             local_nn: torch.Tensor, *, entropy_weight: float = 5.0, local_weight: float = 1.0,
             global_weight: float = 1.0, cluster_weight: float = 1.0, cluster_temperature: float = 1.0):
    """NNM's objective for one head, from logits (N, K) of four views of a batch.

    anchor: the anchors; augmented: a second view of the anchors; neighbour: a random mined
    neighbour of each anchor; global_nn: each anchor's dataset-wide nearest neighbour;
    local_nn: (N,) index of each augmented anchor's nearest other anchor in the batch.
    total = -log<p_a, p_n> + local_weight x -log<p_aug, p_a[local_nn]> + global_weight x -log<p_a, p_g>
            + cluster_weight x cluster_level_loss(p_a, p_n) - entropy_weight x entropy(mean p_a).
    Returns (total, terms) with the terms as detached 0-d tensors (read on the host by the trainer).
    """
    pa, paug, pn, pg = (F.softmax(x.float(), dim=-1) for x in (anchor, augmented, neighbour, global_nn))
    scan_c = consistency_loss(pa, pn)
    local = consistency_loss(paug, pa[local_nn])
    glob = consistency_loss(pa, pg)
    clus = cluster_level_loss(pa, pn, cluster_temperature)
    ent = entropy(pa.mean(0))
    total = scan_c + local_weight * local + global_weight * glob + cluster_weight * clus - entropy_weight * ent
    terms = {"consistency": scan_c, "local": local, "global": glob, "cluster": clus, "entropy": ent}
    return total, {k: v.detach() for k, v in terms.items()}


# --------------------------------------------------------------------------- head selection


@torch.no_grad()
def head_losses(probs: torch.Tensor, neighbours: torch.Tensor, entropy_weight: float = 5.0,
                block: int = 4096) -> torch.Tensor:
    """SCAN's objective of every head over a whole set: probs (H, N, K), neighbours (N, k) -> (H,).

    consistency averaged over every (sample, mined neighbour) pair, minus entropy_weight x
    the entropy of the mean prediction.
    """
    probs = probs.float()
    nb = neighbours.long().to(probs.device)
    n = probs.shape[1]
    total = torch.zeros(probs.shape[0], device=probs.device, dtype=torch.float64)
    for s in range(0, n, block):
        pair = (probs[:, s : s + block, None, :] * probs[:, nb[s : s + block], :]).sum(-1)  # (H, b, k)
        total += -torch.log(pair.clamp(min=EPS)).double().sum(dim=(1, 2))
    cons = (total / (n * nb.shape[1])).float()
    ent = entropy(probs.mean(1))
    return cons - entropy_weight * ent


def select_head(losses: torch.Tensor) -> int:
    """The head with the lowest loss (first on ties)."""
    return int(torch.argmin(losses.float()))

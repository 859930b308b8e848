"""The adaptive softmax head (Grave et al. 2017, "Efficient softmax approximation for GPUs"),
for vocabularies of thousands of symbols (Chinese, Japanese, ...).

A full softmax over V symbols costs ``units * V`` multiply-adds per character, at 5,000
symbols more than the whole 2 x 256 LSTM. The adaptive head splits the symbols by frequency
rank: a *shortlist* of the frequent ones plus one output per *cluster* of rarer ones in the
first layer, and per cluster a small layer (through a projection of ``units / 4**(i+1)``
features) that spreads the cluster's probability over its members:

    p(symbol) = p_head(symbol)                              for shortlist symbols
    p(symbol) = p_head(cluster i) * p_i(symbol | cluster i)  for the members of cluster i

It is an exact model, not an approximation of one: ``log_probs`` gives the full normalised
distribution (what evaluation, sampling and greedy decoding use), and ``nll`` the same
numbers for given targets while computing each cluster only for the positions whose target
lies in it (what makes training cheap). The frequency order is part of the model (the
``order`` buffer, ids by rank); the cluster boundaries are ``ModelConfig.head_cutoffs``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CharLSTMError

PROJECTION_DIVISOR = 4        # cluster i sees units / 4**(i+1) features (Grave et al.'s div_value)
MAX_CLUSTERS = 2              # the cutoff search tries one and two clusters of rare symbols
PANEL = 64                    # the native kernel computes outputs in panels of 64: a shortlist fills them


def projection_size(units: int, cluster: int) -> int:
    return max(1, units // PROJECTION_DIVISOR ** (cluster + 1))


def cluster_bounds(cutoffs: tuple[int, ...], vocab_size: int) -> list[tuple[int, int]]:
    """The rank range [start, stop) of each cluster."""
    edges = [*cutoffs, vocab_size]
    return list(zip(edges[:-1], edges[1:]))


def adaptive_parameter_count(units: int, vocab_size: int, cutoffs: tuple[int, ...]) -> int:
    """Parameters (and the order buffer) of ``AdaptiveHead``, computed without building it."""
    first = cutoffs[0] + len(cutoffs)
    total = units * first + first + vocab_size  # the shortlist layer, its bias, the order
    for i, (start, stop) in enumerate(cluster_bounds(cutoffs, vocab_size)):
        d = projection_size(units, i)
        total += units * d + d * (stop - start) + (stop - start)
    return total


def frequency_order(counts: np.ndarray) -> np.ndarray:
    """Symbol ids from the most to the least frequent (ties: the smaller id first)."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.lexsort((np.arange(len(counts)), -counts))


def choose_cutoffs(counts: np.ndarray, units: int) -> tuple[int, ...]:
    """The cutoffs that minimise the expected multiply-adds per character of training (the
    shortlist layer always, cluster i for the share of characters in it), among shortlists
    that fill whole 64-wide panels and one or two clusters."""
    V = len(counts)
    ranked = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    mass = np.concatenate([[0.0], np.cumsum(ranked)]) / max(ranked.sum(), 1.0)
    best: tuple[float, tuple[int, ...]] = (float("inf"), ())
    for clusters in range(1, MAX_CLUSTERS + 1):
        shortlists = np.arange(PANEL - clusters, V - clusters, PANEL)
        for c1 in shortlists:
            head = units * (c1 + clusters)
            d1 = projection_size(units, 0)
            if clusters == 1:
                cost = head + (1 - mass[c1]) * (units * d1 + d1 * (V - c1))
                candidate = (float(cost), (int(c1),))
            else:
                c2 = np.arange(c1 + PANEL, V, PANEL)
                if not len(c2):
                    continue
                d2 = projection_size(units, 1)
                costs = (head + (mass[c2] - mass[c1]) * (units * d1 + d1 * (c2 - c1))
                         + (1 - mass[c2]) * (units * d2 + d2 * (V - c2)))
                at = int(np.argmin(costs))
                candidate = (float(costs[at]), (int(c1), int(c2[at])))
            best = min(best, candidate)
    if not best[1]:
        raise CharLSTMError(f"an adaptive head needs more than {PANEL} symbols, not {V}")
    return best[1]


def check_cutoffs(cutoffs: tuple[int, ...], vocab_size: int) -> None:
    if not cutoffs:
        raise CharLSTMError("an adaptive head needs its cutoffs (--head-cutoffs N[,N...])")
    if any(not isinstance(c, int) or isinstance(c, bool) for c in cutoffs) or list(cutoffs) != sorted(set(cutoffs)) \
            or cutoffs[0] < 1 or cutoffs[-1] >= vocab_size:
        raise CharLSTMError(f"--head-cutoffs must be increasing whole numbers between 1 and the vocabulary size "
                            f"{vocab_size} (exclusive), not {','.join(map(str, cutoffs))}")


class AdaptiveHead(nn.Module):
    """Hidden states -> next-symbol log-probabilities through a shortlist and clusters."""

    def __init__(self, units: int, vocab_size: int, cutoffs: tuple[int, ...]) -> None:
        super().__init__()
        check_cutoffs(cutoffs, vocab_size)
        self.cutoffs, self.vocab_size = tuple(cutoffs), vocab_size
        self.bounds = cluster_bounds(self.cutoffs, vocab_size)
        self.shortlist = nn.Linear(units, cutoffs[0] + len(cutoffs))
        self.projections = nn.ModuleList(nn.Linear(units, projection_size(units, i), bias=False)
                                         for i in range(len(cutoffs)))
        self.clusters = nn.ModuleList(nn.Linear(projection_size(units, i), stop - start)
                                      for i, (start, stop) in enumerate(self.bounds))
        # ids by frequency rank, stored as floats (checkpoints hold floating-point tensors only;
        # ids up to 65,535 are exact)
        self.register_buffer("order", torch.arange(vocab_size, dtype=torch.float32))

    @property
    def weight(self) -> torch.Tensor:
        """The shortlist layer's weight: where and in which dtype the head lives."""
        return self.shortlist.weight

    @property
    def shortlist_size(self) -> int:
        return self.cutoffs[0]

    def set_order(self, order: np.ndarray | torch.Tensor) -> None:
        with torch.no_grad():
            self.order.copy_(torch.as_tensor(np.asarray(order), dtype=torch.float32))
        self.check_order()

    def check_order(self) -> None:
        """The order must be a permutation of the ids (a checkpoint may claim anything)."""
        ids = self.order.detach().cpu()
        if not torch.equal(ids.round(), ids) or not torch.equal(ids.long().sort().values, torch.arange(len(ids))):
            raise CharLSTMError("the adaptive head's symbol order is not a permutation of the vocabulary")

    def order_ids(self) -> torch.Tensor:
        return self.order.long()

    def ranks(self) -> torch.Tensor:
        """rank of each id: the inverse of ``order``."""
        return torch.argsort(self.order_ids())

    def cluster_log_probs(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """log p_i(member | cluster i) for every member, in rank order, in fp32."""
        return F.log_softmax(self.clusters[i](self.projections[i](x)).float(), dim=-1)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(..., units) -> (..., V) log-probabilities in id order (fp32)."""
        head = F.log_softmax(self.shortlist(x).float(), dim=-1)
        c1 = self.shortlist_size
        parts = [head[..., :c1]] + [head[..., c1 + i:c1 + i + 1] + self.cluster_log_probs(x, i)
                                    for i in range(len(self.clusters))]
        return torch.cat(parts, dim=-1).index_select(-1, self.ranks())

    def nll(self, x: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """(N, units), (N,) ids -> (N,) negative log-probabilities of the targets (0 where
        ignored), each cluster computed only for the rows whose target lies in it."""
        valid = targets != ignore_index
        rank = self.ranks()[targets.clamp(min=0)]
        head = F.log_softmax(self.shortlist(x).float(), dim=-1)
        c1 = self.shortlist_size
        cluster = torch.bucketize(rank, torch.tensor(self.cutoffs, device=rank.device), right=True)
        picked = head.gather(1, torch.where(cluster == 0, rank, c1 + cluster - 1)[:, None])[:, 0]
        for i, (start, _) in enumerate(self.bounds):
            # computed even for no rows: every parameter then takes part in every step (DDP needs it)
            rows = torch.nonzero((cluster == i + 1) & valid)[:, 0]
            inner = self.cluster_log_probs(x[rows], i).gather(1, (rank[rows] - start)[:, None])[:, 0]
            picked = picked.index_add(0, rows, inner.to(picked.dtype))
        return torch.where(valid, -picked, torch.zeros_like(picked))

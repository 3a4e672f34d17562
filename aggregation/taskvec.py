"""LoRA task vectors: dW per module, exact inner products from factors, sketches, clustering.

docs/design.md, 6. Clusters. A LoRA module's task vector is dW = s * B @ A (s = alpha / r, A [r, in],
B [out, r]). Factors are never compared directly: (B, A) and (B Q, Q^-1 A) are one adapter.
- <s1 B1 A1, s2 B2 A2>_F = s1 s2 tr((B1^T B2)(A2 A1^T)), computed with r x r matrices.
- Sketch: (R1 B)(A R2^T) * s with shared-seed Gaussian R1 [k, out], R2 [k, in] (entries
  N(0, 1/k)); E <S(X), S(Y)> = <X, Y>, so sketched cosines approach exact ones as k grows
  (Johnson-Lindenstrauss; error ~ 1/sqrt(k)). Past SIGNATURE_DIM values (about 28 modules
  at k = 6), the per-module sketches are folded into SIGNATURE_DIM values by a second
  shared-seed projection, so a signature's size does not grow with the model.
- Clustering: average-linkage agglomerative clustering on cosine similarity, ties broken by
  index, so the same signatures always give the same clusters.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

SIGNATURE_DIM = 1024  # values in a task signature at most, whatever the model (see `_fold`)


@dataclass(frozen=True)
class LoraFactors:
    """One module's adapter: A [r, in], B [out, r] and scaling s (dW = s * B @ A)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        """r."""
        return int(self.A.shape[0])

    def delta_w(self) -> torch.Tensor:
        """The dense task vector s * B @ A in fp32."""
        return self.scaling * (self.B.float() @ self.A.float())


Adapter = Mapping[str, LoraFactors]


def factor_average_error(
    members: Sequence[LoraFactors], weights: Sequence[float], start: LoraFactors | None = None
) -> float:
    """How far averaging the factors is from averaging the updates, for one module:
    ||s mean(B) mean(A) - mean(s B A)||_F / ||mean(s B A) - s B0 A0||_F with weighted means in
    float64; B0, A0 are the round's start (none: zero), so the error is relative to the exact
    mean change. Zero when every member has the same A (FFA-LoRA), and when the change is 0."""
    total = float(sum(weights))
    w = [float(x) / total for x in weights]
    mean_a = sum(wi * m.A.double() for wi, m in zip(w, members, strict=True))
    mean_b = sum(wi * m.B.double() for wi, m in zip(w, members, strict=True))
    exact = sum(
        wi * m.scaling * (m.B.double() @ m.A.double()) for wi, m in zip(w, members, strict=True)
    )
    assert isinstance(mean_a, torch.Tensor) and isinstance(mean_b, torch.Tensor)
    assert isinstance(exact, torch.Tensor)
    gap = members[0].scaling * (mean_b @ mean_a) - exact
    if start is not None:
        exact = exact - start.scaling * (start.B.double() @ start.A.double())
    norm = float(torch.linalg.matrix_norm(exact))
    return float(torch.linalg.matrix_norm(gap)) / norm if norm > 0 else 0.0


def factor_inner(x: LoraFactors, y: LoraFactors) -> float:
    """<dW_x, dW_y>_F without forming dW: s_x s_y sum((B_x^T B_y) * (A_x A_y^T))."""
    left = x.B.double().T @ y.B.double()  # [r_x, r_y]
    right = x.A.double() @ y.A.double().T  # [r_x, r_y]
    return float(x.scaling * y.scaling * (left * right).sum())


def adapter_inner(x: Adapter, y: Adapter) -> float:
    """Sum over shared modules of the Frobenius inner products; module sets must match."""
    if set(x) != set(y):
        raise KeyError(f"adapters cover different modules: {sorted(set(x) ^ set(y))[:3]}")
    return sum(factor_inner(x[m], y[m]) for m in sorted(x))


def adapter_cosine(x: Adapter, y: Adapter) -> float:
    """Exact cosine between two adapters' concatenated task vectors (0 if either is zero)."""
    norm = math.sqrt(max(adapter_inner(x, x), 0.0) * max(adapter_inner(y, y), 0.0))
    return adapter_inner(x, y) / norm if norm > 0 else 0.0


def _gaussian(rows: int, cols: int, seed: int, label: str) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{label}:{rows}x{cols}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / math.sqrt(rows)


def _module_sketches(adapter: Adapter, k: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Per module, float64: flattened s * (R1 B)(A R2^T) with shared-seed R1, R2."""
    parts = []
    for module in sorted(adapter):
        f = adapter[module]
        r1 = _gaussian(k, f.B.shape[0], seed, f"{module}/out")
        r2 = _gaussian(k, f.A.shape[1], seed, f"{module}/in")
        parts.append((module, (f.scaling * (r1 @ f.B.double()) @ (f.A.double() @ r2.T)).flatten()))
    return parts


def _fold(parts: list[tuple[str, torch.Tensor]], seed: int, dim: int) -> torch.Tensor:
    """The module sketches concatenated while they fit in `dim` values; past that, summed
    through a shared-seed Gaussian projection P_m [dim, k^2] per module (entries N(0, 1/dim)),
    which keeps inner products in expectation (Johnson-Lindenstrauss again, error about
    1/sqrt(dim)) and stays linear in dW, so the size no longer grows with the model."""
    if sum(p.numel() for _, p in parts) <= dim:
        return torch.cat([p for _, p in parts]).float()
    out = torch.zeros(dim, dtype=torch.float64)
    for module, part in parts:
        out += _gaussian(dim, part.numel(), seed, f"{module}/fold") @ part
    return out.float()


def sketch(adapter: Adapter, k: int = 16, seed: int = 0, dim: int = SIGNATURE_DIM) -> torch.Tensor:
    """Signature: the modules' sketches s * (R1 B)(A R2^T) (shared-seed R1, R2), concatenated,
    or folded to `dim` values when there are more (`_fold`)."""
    return _fold(_module_sketches(adapter, k, seed), seed, dim)


def cosine_matrix(signatures: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise cosine similarity of signature vectors (zero vectors get similarity 0)."""
    stacked = torch.stack([s.double() for s in signatures])
    norms = stacked.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, stacked / norms.clamp_min(1e-300), torch.zeros_like(stacked))
    return (unit @ unit.T).clamp(-1, 1)


def agglomerate(
    similarity: torch.Tensor, threshold: float | None = None, k: int | None = None
) -> list[int]:
    """Average-linkage clustering; stop at `k` clusters or when no pair is above `threshold`.

    Returns a label per item, labels numbered by first appearance (0, 1, ...).
    """
    n = similarity.shape[0]
    if (threshold is None) == (k is None):
        raise ValueError("give exactly one of threshold or k")
    clusters: list[list[int]] = [[i] for i in range(n)]
    while len(clusters) > max(k or 1, 1):
        best, pair = -math.inf, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(similarity[clusters[a]][:, clusters[b]].mean())
                if link > best + 1e-12:
                    best, pair = link, (a, b)
        if threshold is not None and best < threshold:
            break
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return _labels(clusters, n)


def _labels(clusters: list[list[int]], n: int) -> list[int]:
    order = sorted(clusters, key=min)
    labels = [0] * n
    for label, members in enumerate(order):
        for i in members:
            labels[i] = label
    return labels


def silhouette(similarity: torch.Tensor, labels: Sequence[int]) -> float:
    """Mean silhouette with distance 1 - cosine; 0 for a single cluster or singletons."""
    distance = 1 - similarity.double()
    n, groups = len(labels), sorted(set(labels))
    if len(groups) < 2:
        return 0.0
    total = 0.0
    for i in range(n):
        own = [j for j in range(n) if labels[j] == labels[i] and j != i]
        if not own:
            continue
        a = float(distance[i, own].mean())
        b = min(
            float(distance[i, [j for j in range(n) if labels[j] == g]].mean())
            for g in groups
            if g != labels[i]
        )
        total += (b - a) / max(a, b, 1e-12)
    return total / n


def auto_cluster(similarity: torch.Tensor, max_k: int | None = None) -> list[int]:
    """Choose k in 2..max_k by the best silhouette (one cluster if nothing separates)."""
    n = similarity.shape[0]
    max_k = min(max_k or n - 1, n - 1)
    best_labels, best_score = [0] * n, 0.25  # below this silhouette, no real structure
    for k in range(2, max_k + 1):
        labels = agglomerate(similarity, k=k)
        score = silhouette(similarity, labels)
        if score > best_score + 1e-9:
            best_labels, best_score = labels, score
    return best_labels


def absorb_small_clusters(
    similarity: torch.Tensor, labels: Sequence[int], min_size: int
) -> list[int]:
    """Merge every cluster smaller than `min_size` into the cluster it is most similar to
    (average linkage), smallest first, until none is left or one cluster remains (a cluster of
    one can never vouch for its rounds; docs/design.md, 8, for what it does not defend)."""
    n = len(labels)
    clusters = [[i for i in range(n) if labels[i] == g] for g in sorted(set(labels))]
    while len(clusters) > 1:
        small = min(range(len(clusters)), key=lambda c: (len(clusters[c]), min(clusters[c])))
        if len(clusters[small]) >= min_size:
            break
        members = clusters.pop(small)
        links = [float(similarity[members][:, other].mean()) for other in clusters]
        into = max(range(len(clusters)), key=lambda c: (links[c], -min(clusters[c])))
        clusters[into] = sorted(clusters[into] + members)
    return _labels(clusters, n)


def adjusted_rand_index(truth: Sequence[object], labels: Sequence[object]) -> float:
    """ARI between two labelings (1.0 = identical partitions, ~0 = chance)."""
    n = len(truth)
    pairs = {(t, p) for t, p in zip(truth, labels, strict=True)}
    count = {
        pair: sum(1 for t, p in zip(truth, labels, strict=True) if (t, p) == pair) for pair in pairs
    }

    def comb2(x: int) -> float:
        return x * (x - 1) / 2

    index = sum(comb2(c) for c in count.values())
    rows = sum(comb2(sum(1 for t in truth if t == v)) for v in set(truth))
    cols = sum(comb2(sum(1 for p in labels if p == v)) for v in set(labels))
    expected = rows * cols / comb2(n) if n > 1 else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


def sketch_change(
    before: Mapping[str, LoraFactors], after: Mapping[str, LoraFactors], k: int, seed: int
) -> torch.Tensor:
    """sketch(dW after) - sketch(dW before), float64: the sketch of the change in dW (the
    sketch is linear in dW, so this is exactly the sketch of dW_after - dW_before)."""
    old, new = _module_sketches(before, k, seed), _module_sketches(after, k, seed)
    change = [(m, b - a) for (m, a), (_, b) in zip(old, new, strict=True)]
    return _fold(change, seed, SIGNATURE_DIM).double()


def stable_ids(labels: Mapping[str, int], previous: Mapping[str, int]) -> dict[str, int]:
    """Rename clusters to the previous id they share most members with (greedy, deterministic)."""
    groups: dict[int, list[str]] = {}
    for peer, label in sorted(labels.items()):
        groups.setdefault(label, []).append(peer)
    taken: set[int] = set()
    rename: dict[int, int] = {}
    by_size = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
    for label, members in by_size:
        votes: dict[int, int] = {}
        for peer in members:
            old = previous.get(peer)
            if old is not None and old not in taken:
                votes[old] = votes.get(old, 0) + 1
        if votes:
            rename[label] = min(votes, key=lambda c: (-votes[c], c))
            taken.add(rename[label])
    fresh = (c for c in range(10_000) if c not in taken and c not in previous.values())
    for label, _ in by_size:
        if label not in rename:
            rename[label] = next(fresh)
    return {peer: rename[label] for peer, label in labels.items()}

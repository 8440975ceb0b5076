"""Fine-tuning metrics: mAP (AudioSet) and top-1 accuracy (VGGSound, ESC-50, SPC-v2)."""
from __future__ import annotations

import torch


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Average precision of one class, as sklearn's average_precision_score: the sum over
    distinct score thresholds, highest first, of precision times the recall gained there
    (tied scores form one threshold). NaN when the class has no positive."""
    positive = positive.bool()
    total = int(positive.sum())
    if total == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    scores, hits = scores[order], positive[order].double()
    tp = hits.cumsum(0)
    ranked = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    last_of_tie = torch.ones(len(scores), dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    tp, ranked = tp[last_of_tie], ranked[last_of_tie]
    recall_gain = torch.diff(tp, prepend=tp.new_zeros(1)) / total
    return float((recall_gain * tp / ranked).sum())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """(mean over the classes with a positive of their AP, how many classes that is), for
    scores and multi-hot targets of shape (clips, classes). Classes without a positive among
    the clips have no AP and are left out (AudioMAE's and AST's scripts average sklearn's
    per-class values, where such a class counts as 0 or NaN)."""
    values = [average_precision(scores[:, c], targets[:, c] > 0.5)
              for c in range(targets.shape[1])]
    kept = [v for v in values if v == v]
    return (sum(kept) / len(kept) if kept else float("nan")), len(kept)


def top1_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The share of clips whose highest-scoring class is one of their labels."""
    best = scores.argmax(dim=1)
    return float((targets.gather(1, best[:, None]).squeeze(1) > 0.5).double().mean())

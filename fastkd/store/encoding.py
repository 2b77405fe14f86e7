"""What is stored of a model's logits: top-k logits + ids + log-sum-exp + true-class logit, or
dense fp16 logits, and the arrays (shapes, dtypes) that hold them.

Storing logits and the log-sum-exp of the full logits keeps the store temperature-agnostic; the
true-class logit makes ``p(y) = exp(true_logit - lse)`` exact even when ``y`` is outside the
top-k, so the partition rule (``fastkd.partition``) is exact on stored targets. The writer
encodes with ``encode_logits``; the writer, the reader and the summary agree on the arrays through
``model_arrays``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fastkd.errors import ConfigError
from fastkd.store.manifest import ModelEntry

if TYPE_CHECKING:  # torch is imported where it is used: inspecting or reading needs only numpy
    import torch

DENSE_MAX_CLASSES = 128  # at or below this many classes dense storage is the default
DENSE_SLACK = 1.25  # dense also wins when its raw bytes are within 25% of sparse's


def id_dtype(num_classes: int) -> np.dtype:
    """Class-id dtype of sparse targets: uint16 up to 65536 classes, else uint32."""
    return np.dtype(np.uint16 if num_classes <= 65536 else np.uint32)


def resolve_topk(num_classes: int, topk: int) -> int:
    """The stored top-k for a model: 0 means dense (all logits in fp16).

    Dense when asked (``topk == 0``), when ``topk >= num_classes``, when ``num_classes <=
    DENSE_MAX_CLASSES`` (at most 256 B a view, exact, so 10 and 100 classes are dense), or when the
    dense row is at most ``DENSE_SLACK`` x the raw sparse row: ``2 C <= 1.25 K (2 + id bytes)``.
    """
    if num_classes < 1 or topk < 0:
        raise ConfigError(f"need num_classes >= 1 and topk >= 0, got {num_classes}, {topk}")
    sparse_bytes = topk * (2 + id_dtype(num_classes).itemsize)
    dense = (
        topk == 0
        or topk >= num_classes
        or num_classes <= DENSE_MAX_CLASSES
        or 2 * num_classes <= DENSE_SLACK * sparse_bytes
    )
    return 0 if dense else topk


def encode_logits(
    logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, topk: int
) -> dict[str, np.ndarray]:
    """Full logits [n, V, C] of one model -> the stored arrays, as numpy on the CPU.

    ``lse`` [n, V] fp32 and ``true_logit`` [n, V] fp32 come from the fp32 logits; sparse
    (``topk > 0``): ``topk_logits`` [n, V, K] fp16 sorted descending and ``topk_ids`` [n, V, K];
    dense (``topk == 0``): ``logits`` [n, V, C] fp16. Runs on the logits' device.
    """
    import torch

    z = torch.as_tensor(logits)
    if z.dim() != 3:
        raise ConfigError(f"logits must be [samples, views, classes], got {tuple(z.shape)}")
    n, _, num_classes = z.shape
    z = z.float()
    y = torch.as_tensor(labels, device=z.device).long()
    if y.shape != (n,):
        raise ConfigError(
            f"labels must be [{n}] for logits of shape {tuple(z.shape)}, got {tuple(y.shape)}"
        )
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(f"labels must be in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    if not torch.isfinite(z).all():
        raise ConfigError("logits contain NaN or infinity")
    out = {
        "lse": torch.logsumexp(z, dim=-1),
        "true_logit": z.gather(-1, y.view(n, 1, 1).expand(n, z.shape[1], 1)).squeeze(-1),
    }
    if topk == 0:
        out["logits"] = z.half()
    else:
        values, ids = torch.topk(z, topk, dim=-1, largest=True, sorted=True)
        out["topk_logits"] = values.half()
        out["topk_ids"] = ids.to(torch.int32)
    arrays = {k: v.cpu().numpy() for k, v in out.items()}
    if "topk_ids" in arrays:
        arrays["topk_ids"] = arrays["topk_ids"].astype(id_dtype(num_classes))
    return arrays


def model_arrays(entry: ModelEntry, views: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (per-sample shape, dtype) of one model's arrays."""
    arrays = {
        "lse": ((views,), np.dtype(np.float32)),
        "true_logit": ((views,), np.dtype(np.float32)),
    }
    if entry.topk == 0:
        arrays["logits"] = ((views, entry.num_classes), np.dtype(np.float16))
    else:
        arrays["topk_logits"] = ((views, entry.topk), np.dtype(np.float16))
        arrays["topk_ids"] = ((views, entry.topk), id_dtype(entry.num_classes))
    return arrays

"""What is stored of a model's logits, and the arrays (shapes, dtypes) that hold them.

The rule itself (log-probabilities, the exact label log-probability, the tail's masses, the tail
models) is ``fastkd.compression``'s; this module decides dense or sparse for a model
(``resolve_topk``), turns a block's logits into numpy arrays to write (``encode_logits``: the
sampled tail's uniforms come from the view-replay RNG, so a resumed dump rewrites a block byte for
byte), and names the arrays the writer, the reader and the summary agree on (``model_arrays``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fastkd.compression import TailModel, compress_logits, id_bytes
from fastkd.errors import ConfigError
from fastkd.store.manifest import ModelEntry
from fastkd.views import tail_uniforms

if TYPE_CHECKING:  # torch is imported where it is used: inspecting or reading needs only numpy
    import torch

DENSE_MAX_CLASSES = 128  # at or below this many classes dense storage is the default
DENSE_SLACK = 1.25  # dense also wins when its raw bytes are within 25% of sparse's


def id_dtype(num_classes: int) -> np.dtype:
    """Class-id dtype of sparse targets: uint16 up to 65536 classes, else uint32."""
    return np.dtype(np.uint16 if id_bytes(num_classes) == 2 else np.uint32)


def resolve_topk(num_classes: int, topk: int, tail: str | None = None) -> int:
    """The stored top-k for a model: 0 means dense (every log-probability in fp16).

    Dense when asked (``topk == 0``) or when ``topk >= num_classes``. Without an explicit
    ``tail`` also when ``num_classes <= DENSE_MAX_CLASSES`` (at most 256 B a view, exact, so 10 and
    100 classes are dense), or when the dense row is at most ``DENSE_SLACK`` x the raw sparse row:
    ``2 C <= 1.25 K (2 + id bytes)``. Naming a tail asks for sparse targets whenever ``K < C``.
    """
    if num_classes < 1 or topk < 0:
        raise ConfigError(f"need num_classes >= 1 and topk >= 0, got {num_classes}, {topk}")
    if topk == 0 or topk >= num_classes:
        return 0
    if tail is not None:
        return topk
    sparse_bytes = topk * (2 + id_dtype(num_classes).itemsize)
    small = num_classes <= DENSE_MAX_CLASSES or 2 * num_classes <= DENSE_SLACK * sparse_bytes
    return 0 if small else topk


def encode_logits(
    logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    entry: ModelEntry,
    *,
    seed: int = 0,
    first_sample: int = 0,
    model_index: int = 0,
) -> dict[str, np.ndarray]:
    """Full logits [n, V, C] of one model for samples ``first_sample ..`` -> the stored arrays.

    Computed on the logits' device in fp32 (``fastkd.compression.compress_logits``), returned as
    numpy in the stored dtypes (``model_arrays``). The sampled tail's uniforms are
    ``views.tail_uniforms(seed, sample, view, model_index)``.
    """
    import torch

    z = torch.as_tensor(logits)
    if z.dim() != 3:
        raise ConfigError(f"logits must be [samples, views, classes], got {tuple(z.shape)}")
    n, views, num_classes = z.shape
    y = torch.as_tensor(labels, device=z.device).long()
    if y.shape != (n,):
        raise ConfigError(
            f"labels must be [{n}] for logits of shape {tuple(z.shape)}, got {tuple(y.shape)}"
        )
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(f"labels must be in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    if not torch.isfinite(z).all():
        raise ConfigError("logits contain NaN or infinity")
    tail = entry.tail if entry.topk else TailModel.UNIFORM
    uniforms = None
    if entry.topk and tail is TailModel.SAMPLED:
        samples = np.repeat(np.arange(first_sample, first_sample + n), views)
        view_ids = np.tile(np.arange(views), n)
        uniforms = tail_uniforms(seed, samples, view_ids, model_index).reshape(n, views)
        uniforms = torch.from_numpy(uniforms).to(z.device)
    kept = compress_logits(
        z, y.unsqueeze(1).expand(n, views), entry.topk, tail, entry.tail_samples, uniforms
    )
    dtypes = model_arrays(entry, views)
    return {name: kept[name].cpu().numpy().astype(dtypes[name][1]) for name in dtypes}


def model_arrays(entry: ModelEntry, views: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (per-sample shape, dtype) of one model's arrays."""
    fp16, fp32 = np.dtype(np.float16), np.dtype(np.float32)
    arrays = {"true_logprob": ((views,), fp32)}
    if entry.topk == 0:
        arrays["logprobs"] = ((views, entry.num_classes), fp16)
        return arrays
    ids = id_dtype(entry.num_classes)
    arrays["topk_logprobs"] = ((views, entry.topk), fp16)
    arrays["topk_ids"] = ((views, entry.topk), ids)
    arrays["log_tail"] = ((views,), fp32)
    arrays["log_tail_sqrt"] = ((views,), fp16)
    if entry.tail is TailModel.SAMPLED:
        arrays["tail_ids"] = ((views, entry.tail_samples), ids)
    return arrays

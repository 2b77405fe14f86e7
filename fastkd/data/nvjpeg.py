"""The nvjpeg backend of ``fastkd.data.view_loader``: JPEGs decoded on the GPU without DALI.

On a GPU machine without DALI, PIL's decoding on the CPU is too slow to feed a pool's forward;
torchvision decodes JPEGs on the GPU with nvJPEG. A torch ``DataLoader``'s workers (processes)
do, per planned batch, what must stay on the host: read each file through the one gate
(``Items.checked_bytes``: refused files become failures as on the other backends), hash it, and
sort it. A JPEG the device decodes by the project's rule (``device_decodable``: 8-bit baseline or
progressive Huffman coding, grey or YCbCr, whole) travels as its bytes; anything else (PNG, a
CMYK or 12-bit JPEG, a file only PIL takes, ...) is decoded, cropped, resized and flipped there
by PIL, as the torch backend does (``load_view``). The main process decodes a batch's JPEGs in
one ``torchvision.io.decode_jpeg`` call on the device (nvJPEG on CUDA; torchvision's
libjpeg-turbo on a CPU device, which is how the tests run this path), then crops, resizes and
flips each there as PIL does (``resize_like_pil``), so both paths hand ``normalize`` the same
kind of uint8 images, in planned order.

- Decoding rule (``fastkd.data.decoding``): in RGB mode grey is repeated into R, G and B, and
  EXIF orientation is ignored (``decode_jpeg``'s default, kept).
- Lanczos: torch has no such kernel, so a data config that asks for it gets every item's view
  from PIL in the workers, JPEGs included (decoded there too); the other configs' JPEG views are
  still made on the device.
- A JPEG the device decoder rejects (a ``RuntimeError`` other than the device's own: out of
  memory, a CUDA error) is found by decoding the batch's JPEGs one by one, and made by PIL as the
  torch backend makes it; one PIL cannot decode either fails alone, through
  ``resolve_failures``, with PIL's reason, as on the torch backend.

torchvision is imported lazily: importing ``fastkd.data`` does not import it.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from fastkd.data.batches import (
    Items,
    LoadPlan,
    Preprocess,
    ViewBatch,
    load_view,
    normalize,
    resolve_failures,
    stack_views,
    worker_loader,
)
from fastkd.hashing import content_hash

log = logging.getLogger(__name__)

DEVICE_RESIZE = frozenset({"nearest", "bilinear", "bicubic"})  # PIL's filters torch can match
_SOF_DEVICE = frozenset({0xC0, 0xC2})  # frame headers: baseline, progressive (Huffman coding)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # every frame header (not DHT, JPG, DAC)
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: markers without a length


def device_decodable(data: bytes) -> bool:
    """Whether the device decoder takes these bytes by the project's rule: a JPEG whose frame
    header (its first SOF marker) says 8-bit baseline or progressive Huffman coding of one
    component (grey) or three in YCbCr, not RGB-coded ones (an Adobe marker with transform 0,
    or components named R, G, B, which libjpeg reads as RGB). Anything else is PIL's."""
    if data[:2] != b"\xff\xd8":
        return False
    at, adobe_transform = 2, None
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        segment = data[at + 4 : at + 2 + length]
        if marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_transform = segment[11]
        if marker in _SOF:
            if marker not in _SOF_DEVICE or len(segment) < 6 or segment[0] != 8:
                return False
            components = segment[5]
            if components == 1:
                return True
            return (
                components == 3
                and len(segment) >= 15
                and adobe_transform != 0
                and bytes(segment[6:15:3]) != b"RGB"
            )
        if marker == 0xDA:  # a scan before any frame header
            return False
        at += 2 + length
    return False


def resize_like_pil(
    crop: torch.Tensor, height: int, width: int, interpolation: str
) -> torch.Tensor:
    """uint8 [3, h, w] -> uint8 [3, height, width] as PIL's ``resize`` makes it, on the crop's
    device. Bilinear and bicubic: torch's antialiased kernels (PIL's, with a = -0.5) in float32,
    one axis at a time as PIL does, width first, each pass rounded and clamped to uint8 as PIL
    stores it (a single pass differs from PIL by several levels on upscales; docs/throughput.md).
    Nearest: PIL's own source rows and columns (``_pil_nearest``), so exactly PIL's."""
    if interpolation == "nearest":
        rows = _pil_nearest(crop.shape[1], height, crop.device)
        columns = _pil_nearest(crop.shape[2], width, crop.device)
        return crop.index_select(1, rows).index_select(2, columns)
    if interpolation not in DEVICE_RESIZE:
        raise ValueError(f"no device resize matches PIL's {interpolation!r}")
    image = crop[None].float()
    for size in ((crop.shape[1], width), (height, width)):
        if tuple(image.shape[2:]) != size:
            image = F.interpolate(
                image, size=size, mode=interpolation, antialias=True, align_corners=False
            )
            image = image.round_().clamp_(0, 255)
    return image[0].to(torch.uint8)


@functools.lru_cache(maxsize=1024)
def _pil_nearest(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """The source index of each output pixel of PIL's nearest resize: PIL adds the scale
    ``size_in / size_out`` to ``scale / 2`` pixel by pixel in doubles and truncates, so its
    choice at exact ties is its sum's (``torch``'s nearest-exact differs from it at some ties;
    docs/throughput.md). Built once per pair of sizes and device."""
    scale = size_in / size_out
    sums = np.cumsum(np.r_[scale * 0.5, np.full(size_out - 1, scale)])  # sequential, as PIL
    index = np.minimum(sums.astype(np.int64), size_in - 1)
    return torch.from_numpy(index).to(device)


# -- the workers' part ----------------------------------------------------------------------------


class _HostPart(NamedTuple):
    """What a worker hands the main process for one planned batch."""

    kept: np.ndarray  # int64 [k]: the positions the worker did not refuse, in planned order
    hashes: np.ndarray  # int64 [k]: their files' content hashes
    on_device: np.ndarray  # bool [k]: the item's JPEG is decoded on the device
    encoded: torch.Tensor  # uint8: the device items' files, one after the other (one tensor to
    # share with the main process, not one a file: each costs a file descriptor)
    sizes: np.ndarray  # int64 [d]: each device item's file size
    boxes: np.ndarray  # int64 [d, 4]: each device item's pixel box (top, left, h, w)
    host_images: list[torch.Tensor]  # per data config uint8 [m, 3, H, W]: the views made here
    failed: dict[int, str]  # position -> why


def _made_on_host(prep: Preprocess) -> bool:
    return prep.interpolation not in DEVICE_RESIZE


class _HostSource(torch.utils.data.Dataset):
    """Element ``j`` is planned batch ``j``'s host part (``_HostPart``), made in a worker."""

    def __init__(self, items: Items, preps: list[Preprocess], batches: list[np.ndarray]):
        self.items, self.preps, self.batches = items, preps, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> _HostPart:
        items, preps, positions = self.items, self.preps, self.batches[index]
        kept, hashes, on_device, encoded, boxes = [], [], [], [], []
        planes: list[list[np.ndarray]] = [[] for _ in preps]
        failed: dict[int, str] = {}
        all_here = all(_made_on_host(prep) for prep in preps)  # nothing left for the device
        checked = items.checked_batch(positions)  # read once, together: checked, hashed
        boxes_here = items.pixel_boxes(positions)
        for position, box, (data, why, pil_only) in zip(
            positions, boxes_here, checked, strict=True
        ):
            if data is None:
                failed[int(position)] = why
                continue
            to_device = not pil_only and not all_here and device_decodable(data)
            here = [i for i, prep in enumerate(preps) if not to_device or _made_on_host(prep)]
            flip, name = items.flips[position], items.name(position)
            try:
                views = load_view(name, box, flip, [preps[i] for i in here], data) if here else []
            except Exception as error:  # PIL raises many types for bad files
                failed[int(position)] = f"{type(error).__name__}: {error}"
                continue
            for i, view in zip(here, views, strict=True):
                planes[i].append(view)
            if to_device:
                encoded.append(data)
                boxes.append(box)
            kept.append(int(position))
            hashes.append(content_hash(data))
            on_device.append(to_device)
        return _HostPart(
            kept=np.asarray(kept, dtype=np.int64),
            hashes=np.asarray(hashes, dtype=np.int64),
            on_device=np.asarray(on_device, dtype=bool),
            encoded=torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8)
            if encoded
            else torch.empty(0, dtype=torch.uint8),
            sizes=np.asarray([len(data) for data in encoded], dtype=np.int64),
            boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
            host_images=stack_views(planes, preps),
            failed=failed,
        )


# -- the main process: decode on the device, assemble ----------------------------------------------


def nvjpeg_unavailable(device: torch.device) -> str | None:
    """What this backend lacks to decode JPEGs on ``device`` here, or None: torchvision's
    ``decode_jpeg``, and on ``device`` a test JPEG decoded by it (nvJPEG on CUDA)."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError as error:
        return f"torchvision.io.decode_jpeg, which cannot be imported here ({error})"
    return _probe(device)


@functools.cache
def _probe(device: torch.device) -> str | None:
    """Why a tiny JPEG does not decode on ``device`` (torchvision built without nvJPEG, no
    GPU, ...), or None. Once per device and process."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(out, "JPEG")
    encoded = torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)
    try:
        _decode_jpegs([encoded], device)
    except Exception as error:  # torchvision and CUDA raise several types
        return f"torchvision able to decode JPEGs on {device} ({type(error).__name__}: {error})"
    return None


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One batched ``decode_jpeg`` call: uint8 [3, H, W] each, on ``device``, by our rule."""
    import torchvision.io

    with warnings.catch_warnings():  # deprecated for TorchCodec from 0.29 on, still there
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return torchvision.io.decode_jpeg(
            encoded, mode=torchvision.io.ImageReadMode.RGB, device=device
        )


def _decode(
    encoded: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """The batch's JPEGs decoded in one call; if it fails, one by one: the images (None where
    the decoder rejected the file) and {index: why} of the rejected. The device's own failures
    (out of memory, a CUDA error) are raised: they say nothing about a file."""
    if not encoded:
        return [], {}
    try:
        return list(_decode_jpegs(encoded, device)), {}
    except RuntimeError as error:
        if _device_failure(error):
            raise
    images: list[torch.Tensor | None] = []
    rejected: dict[int, str] = {}
    for index, data in enumerate(encoded):
        try:
            (image,) = _decode_jpegs([data], device)
        except RuntimeError as error:
            if _device_failure(error):
                raise
            image, rejected[index] = None, f"{type(error).__name__}: {' '.join(str(error).split())}"
        images.append(image)
    return images, rejected


# What torchvision's GPU decoder says of the device's own failures, inside the plain
# RuntimeError("Error while decoding JPEG images: ...") it wraps every error in
_DEVICE_FAILURES = ("out of memory", "CUDA error", "Failed to synchronize CUDA stream")


def _device_failure(error: RuntimeError) -> bool:
    """Whether a decoder error is the device's (out of memory, a CUDA error), not the file's."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or any(s in text for s in _DEVICE_FAILURES)


def _by_pil(
    items: Items,
    part: _HostPart,
    encoded: list[torch.Tensor],
    rejected: dict[int, str],
    preps: Sequence[Preprocess],
) -> tuple[dict[int, list[np.ndarray]], dict[int, str]]:
    """The device items the decoder rejected, made by PIL as the torch backend makes them
    (``load_view``): {device index: views per data config the device resizes}, and
    {position: why} of those PIL cannot decode either, which fail."""
    positions = part.kept[part.on_device]
    on_device = [prep for prep in preps if not _made_on_host(prep)]  # the others: made already
    views, failed = {}, {}
    for index, why in rejected.items():
        position = int(positions[index])
        log.warning("the GPU decoder rejected %s (%s): PIL makes it", items.name(position), why)
        try:
            views[index] = load_view(
                items.name(position),
                part.boxes[index],
                items.flips[position],
                on_device,
                encoded[index].numpy().tobytes(),
            )
        except Exception as error:  # PIL raises many types for bad files
            failed[position] = f"{type(error).__name__}: {error}"
    return views, failed


def _assemble(
    part: _HostPart,
    decoded: Sequence[torch.Tensor | None],
    by_pil: dict[int, list[np.ndarray]],
    flips: np.ndarray,
    preps: Sequence[Preprocess],
    device: torch.device,
) -> list[torch.Tensor]:
    """Per data config uint8 [k, 3, H, W] on ``device`` in the part's order: the workers' views
    copied in, each decoded JPEG cropped, resized and flipped here, PIL's views of the ones the
    decoder rejected (``by_pil``, by device index) copied in (rows of files neither decodes are
    left unset: the caller drops them)."""
    device_rows = np.flatnonzero(part.on_device)
    out = []
    for prep, host in zip(preps, part.host_images, strict=True):
        shape = (len(part.kept), 3, prep.height, prep.width)
        images = torch.empty(shape, dtype=torch.uint8, device=device)
        rows = np.flatnonzero(~part.on_device | _made_on_host(prep))
        if rows.size:
            images[torch.from_numpy(rows).to(device)] = host.to(device, non_blocking=True)
        out.append(images)
    for index, (row, image, box) in enumerate(zip(device_rows, decoded, part.boxes, strict=True)):
        if image is None:
            on_device = [images for prep, images in zip(preps, out, strict=True)
                         if not _made_on_host(prep)]  # fmt: skip
            for images, view in zip(on_device, by_pil.get(index, ()), strict=False):
                images[row] = torch.from_numpy(view).to(device)
            continue
        top, left, height, width = (int(v) for v in box)
        crop = image[:, top : top + height, left : left + width]
        for prep, images in zip(preps, out, strict=True):
            if _made_on_host(prep):
                continue
            view = resize_like_pil(crop, prep.height, prep.width, prep.interpolation)
            images[row] = view.flip(-1) if flips[row] else view
    return out


def nvjpeg_batches(plan: LoadPlan, num_workers: int) -> Iterator[ViewBatch]:
    """The plan's batches: the workers' host parts, their JPEGs decoded on the device in one
    call a batch, every item's views assembled in planned order and normalised; the items
    refused by the workers or rejected by the decoder reported (``fail``) or dropped (``skip``)."""
    items, preps, device = plan.items, plan.preps, plan.device
    loader = worker_loader(_HostSource(items, preps, plan.batches), num_workers, device)
    for part in loader:
        encoded = list(part.encoded.split(part.sizes.tolist()))
        decoded, rejected = _decode(encoded, device)
        by_pil, unreadable = _by_pil(items, part, encoded, rejected, preps)
        failed = {**part.failed, **unreadable}
        skipped = resolve_failures(items, failed, plan.on_bad_image)
        images = _assemble(part, decoded, by_pil, items.flips[part.kept], preps, device)
        keep = np.isin(part.kept, list(failed), invert=True)
        if not keep.all():
            index = torch.from_numpy(np.flatnonzero(keep)).to(device)
            images = [image.index_select(0, index) for image in images]
        images = [normalize(image, prep) for image, prep in zip(images, preps, strict=True)]
        yield items.batch(part.kept[keep], images, skipped, part.hashes[keep])

"""Offline distillation: run the teacher once over the training set, store what the terms need, replay it.

A cache is a folder: ``manifest.json`` plus, for each stored field, shards of ``shard_size`` samples
(``logits-00000.npy``, ...), memory-mapped when read and keyed by the sample's index in the training set
(the third item of an ``IndexedDataset`` batch). The manifest records the teacher's checksum, the data
set's fingerprint, the dtype and the top-k; :class:`CachedTeacher` refuses a cache whose teacher or data
do not match, before step 0.

With a large vocabulary (causal LMs), ``top_k`` stores each token's k largest log-probabilities, their
token ids and the remaining tail mass; the replayed logits are those log-probabilities with the tail
spread evenly over the other tokens, so every loss sees a full distribution of the right total mass.

Random augmentation would make the stored outputs belong to other views than the student sees, so
caching (and training from a cache) refuses an augmented training set.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import send_to_device
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from alambic.core.batches import split_batch
from alambic.core.cache_widths import cut_to_width, mask_width, pad_to_width, token_axes_of
from alambic.core.distiller import Teacher, feature_paths
from alambic.core.hooks import unwrap_model
from alambic.data import dataset_fingerprint, token_lengths
from alambic.data.loaders import PaddingTrimmer
from alambic.errors import ConfigError, first_line
from alambic.files import dumps_json
from alambic.losses import get_loss_spec

FORMAT_VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}


def teacher_checksum(model: nn.Module) -> str:
    """sha256 over the teacher's state dict (names, shapes, dtypes and values), as a hex digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap_model(model).state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim buffers too
    return digest.hexdigest()


def _augmented(dataset: Dataset) -> bool:
    while dataset is not None:
        if getattr(dataset, "augmentation", None) is not None:
            return True
        dataset = getattr(dataset, "dataset", None)  # IndexedDataset, Subset
    return False


def check_not_augmented(dataset: Dataset) -> None:
    """A cache holds one view per sample: refuse a training set with random augmentation."""
    if _augmented(dataset):
        raise ConfigError(
            "the training set is randomly augmented, so cached teacher outputs would belong to other views "
            "than the student sees; turn augmentation off (data.augment: false) or use the live teacher"
        )


def cache_teacher(
    teacher: nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    *,
    features: Sequence[str] = (),
    top_k: int | None = None,
    dtype: str = "float32",
    batch_size: int = 256,
    shard_size: int = 50_000,
    device: str | torch.device = "cpu",
    process_index: int = 0,
    num_processes: int = 1,
    barrier: Any = None,
    dynamic_padding: bool = False,
) -> dict:
    """Run ``teacher`` once over ``dataset`` (in index order) and write a cache folder; returns its manifest.

    With several processes (``accelerate launch`` / ``torchrun``: ``process_index`` of ``num_processes``,
    ``barrier`` waiting for all of them) the shards are dealt out: process ``r`` computes and writes
    shards ``r``, ``r + P``, ... into one staging folder (on a file system all processes share), and
    process 0, which always holds shard 0, writes the one manifest and renames the folder when every
    process is done. Each shard is the same whoever computes it, so the cache does not depend on ``P``.

    Args:
        teacher: the frozen teacher model.
        dataset: the training set, yielding ``(inputs, label)`` (not augmented).
        out_dir: a new folder; it is written under a temporary name and renamed when complete.
        features: teacher feature paths to store as well (``layer3``, ``hidden_states.6``, ...).
        top_k: store only the k largest log-probabilities per row (and the tail mass), for LM vocabularies.
        dtype: ``float32`` or ``float16`` storage.
        batch_size: teacher batch size.
        shard_size: samples per shard file.
        device: where the teacher runs (each process's own GPU under a launcher).
        process_index, num_processes, barrier: this process, how many share the work, and a function
            that returns once every process has called it (Accelerate's ``wait_for_everyone``).
        dynamic_padding: token rows (with an ``attention_mask``; other data is left as it is) run
            through the teacher longest first within each shard, each batch cut to its longest row
            (:func:`alambic.data.trim_padding`), and are stored back in index order; per-token outputs
            are padded back to the data's width with zeros (columns that were padding in every row of
            their batch, which no loss reads). Outputs at real tokens match the full-width run to float
            rounding.

    Example:
        >>> manifest = cache_teacher(teacher, train_set, "cache/resnet56", batch_size=512)
        >>> cached = CachedTeacher("cache/resnet56", teacher=teacher, dataset=train_set)
    """
    out_dir = Path(out_dir)
    _check_request(dataset, out_dir, dtype, top_k)
    barrier = barrier or (lambda: None)
    live = Teacher(teacher).to(device)
    live.feature_paths = list(features)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # one staging name every process agrees on (a temporary name would differ between processes)
    staging = out_dir.parent / f".{out_dir.name}.partial"
    if process_index == 0:
        shutil.rmtree(staging, ignore_errors=True)  # what an earlier, interrupted build left
        staging.mkdir()
    barrier()
    try:
        numbers = range(process_index, math.ceil(len(dataset) / shard_size), num_processes)
        written = _write_shards(live, dataset, staging, numbers, shard_size, batch_size, top_k, dtype, device,
                                dynamic_padding)  # fmt: skip
        barrier()  # every shard written
        manifest = _manifest(teacher, dataset, written, dtype, top_k, shard_size, features)
        if process_index == 0:  # it computed shard 0, so it knows every field's shape
            (staging / "manifest.json").write_text(dumps_json(manifest, indent=2))
            staging.rename(out_dir)
        barrier()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _check_request(dataset: Dataset, out_dir: Path, dtype: str, top_k: int | None) -> None:
    """One-line errors, before the teacher runs, for settings and data a cache cannot be built from."""
    if dtype not in DTYPES:
        raise ConfigError(f"cache dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists; remove it or pick another --out")
    if len(dataset) == 0:
        raise ConfigError("the data set to cache is empty; check data.train_subset and the data files")
    check_not_augmented(dataset)


def _write_shards(
    live: Teacher, dataset: Dataset, staging: Path, numbers: range, shard_size: int, batch_size: int,
    top_k: int | None, dtype: str, device: Any, dynamic_padding: bool,
) -> dict[str, Any]:  # fmt: skip
    """Compute shards ``numbers`` of the cache and save them into ``staging``; returns what the manifest
    needs: each field's row shape, the vocabulary size, the token rows' width and their token axes."""
    lengths = _row_lengths(dataset) if dynamic_padding else None
    width = mask_width(dataset)  # token rows' stored width; None for data without an attention mask

    def stored(inputs: Any) -> dict[str, Tensor]:
        return _teacher_rows(live, inputs, device, top_k)[0]

    # which outputs grow with the tokens: probed on two rows, at full width and one token narrower
    token_axes = token_axes_of(stored, dataset, strict=lengths is not None) if width else None
    written = {"shapes": {}, "vocab_size": None, "width": width, "token_axes": token_axes}
    for number in numbers:
        indices = torch.arange(number * shard_size, min((number + 1) * shard_size, len(dataset)))
        if lengths is not None:  # longest first: batches of similar widths, cut to their longest row
            indices = indices[torch.sort(lengths[indices], descending=True, stable=True).indices]
        trimmed = None if lengths is None else PaddingTrimmer(default_collate)
        loader = DataLoader(Subset(dataset, indices.tolist()), batch_size, shuffle=False, collate_fn=trimmed)
        parts: dict[str, list[np.ndarray]] = {}
        for batch in loader:
            inputs = split_batch(batch)[0]
            rows, written["vocab_size"] = _teacher_rows(live, inputs, device, top_k)
            if lengths is not None:
                rows = pad_to_width(rows, token_axes, width - inputs["attention_mask"].shape[1])
            _collect(rows, written["shapes"], parts, dtype)
        restore = torch.argsort(indices).numpy()  # back to index order
        for name, arrays in parts.items():
            np.save(staging / _shard_file(name, number), np.concatenate(arrays)[restore])
    return written


def _collect(rows: dict[str, Tensor], shapes: dict[str, list], parts: dict[str, list], dtype: str) -> None:
    """Add a batch's outputs to ``parts`` (floats in the storage dtype); every batch keeps one row shape."""
    for name, value in rows.items():
        if shapes.setdefault(name, list(value.shape[1:])) != list(value.shape[1:]):
            raise ConfigError(
                f"teacher output {name!r} has rows of shape {shapes[name]} in one batch and "
                f"{list(value.shape[1:])} in another; cache a teacher whose outputs keep one shape"
            )
        array = value.cpu().numpy()
        parts.setdefault(name, []).append(array.astype(DTYPES[dtype]) if array.dtype.kind == "f" else array)


def _manifest(
    teacher: nn.Module, dataset: Dataset, written: dict, dtype: str, top_k: int | None, shard_size: int,
    features: Sequence[str],
) -> dict[str, Any]:  # fmt: skip
    """``manifest.json``: what the cache holds and what it was made from (checked when it is read)."""
    token_axes = written["token_axes"]
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "teacher_checksum": teacher_checksum(teacher),
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "num_samples": len(dataset),
        "dtype": dtype,
        "top_k": top_k,
        "vocab_size": written["vocab_size"],
        "shard_size": shard_size,
        "fields": {
            name: {
                "shape": shape,
                "shards": [_shard_file(name, n) for n in range(math.ceil(len(dataset) / shard_size))],
            }
            for name, shape in written["shapes"].items()
        },
        "features": list(features),
        "width": written["width"],  # token data: the rows' stored width
        **({"token_axes": token_axes} if token_axes is not None else {}),
    }


def _shard_file(name: str, number: int) -> str:
    return f"{name}-{number:05d}.npy"


def _teacher_rows(
    live: Teacher, inputs: Any, device: Any, top_k: int | None
) -> tuple[dict[str, Tensor], Any]:
    """What is stored for one batch (float32 outputs; top-k log-probabilities for ``top_k``) and the
    vocabulary size when the logits were reduced to their top k."""
    rows, vocab_size = {}, None
    for name, value in live(send_to_device(inputs, device)).items():
        value = value.float()
        if name == "logits" and top_k is not None:
            rows.update(_top_k(value, top_k))
            vocab_size = value.shape[-1]
        else:
            rows[name] = value
    return rows, vocab_size


def _row_lengths(dataset: Dataset) -> Tensor | None:
    """Token rows' lengths, or None for data without an attention mask (images: nothing to cut)."""
    try:
        return token_lengths(dataset)
    except ConfigError:
        return None


def _top_k(logits: Tensor, k: int) -> dict[str, Tensor]:
    """The k largest log-probabilities, their ids and the probability mass of all the other entries."""
    log_probs = torch.log_softmax(logits, dim=-1)  # [..., V]
    values, ids = log_probs.topk(min(k, logits.shape[-1]), dim=-1)  # [..., k]
    tail = (1 - values.exp().sum(-1)).clamp_min(0)  # [...]
    return {"topk_log_probs": values, "topk_ids": ids.to(torch.int32), "tail_mass": tail}


_REBUILD = "remove the folder and rebuild it with cache-teacher"


class _FieldEntry(BaseModel):
    model_config = ConfigDict(strict=True)
    shape: list[int]
    shards: list[str] = Field(min_length=1)


class _Manifest(BaseModel):
    """What :class:`CachedTeacher` reads from ``manifest.json``, with its types (other keys are kept)."""

    model_config = ConfigDict(strict=True, extra="allow")
    format_version: int
    teacher_checksum: str
    dataset_fingerprint: str
    num_samples: int = Field(ge=1)
    shard_size: int = Field(ge=1)
    fields: dict[str, _FieldEntry] = Field(min_length=1)
    features: list[str]
    vocab_size: int | None = None
    width: int | None = None  # token data: the rows' stored width
    # token data: each field's row axes that grow with the tokens (None: a field that cannot be cut)
    token_axes: dict[str, list[int] | None] | None = None


def read_manifest(path: Path) -> dict:
    """A cache's ``manifest.json``, checked: valid JSON, the keys and types alambic wrote, safe shard names."""
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{path} is not valid JSON ({error}); {_REBUILD}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ConfigError(f"{path}: cache format {version} is not {FORMAT_VERSION}; {_REBUILD}")
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}; {_REBUILD}") from None
    for field in manifest["fields"].values():
        for file in field["shards"]:
            # shards live in the cache folder itself: a path elsewhere (absolute, ../) is refused
            if Path(file).name != file or file in (".", ".."):
                raise ConfigError(f"{path} names shard {file!r} outside the cache folder; {_REBUILD}")
    return manifest


def _open_shards(folder: Path, name: str, field: dict, num_samples: int, shard_size: int) -> list:
    """The field's shards, memory-mapped, each checked to hold the rows and row shape the manifest says."""
    expected_count = math.ceil(num_samples / shard_size)
    if len(field["shards"]) != expected_count:
        raise ConfigError(
            f"{folder}/manifest.json lists {len(field['shards'])} {name} shards for {num_samples} samples "
            f"of {shard_size} per shard (expected {expected_count}); {_REBUILD}"
        )
    shards = []
    for number, file in enumerate(field["shards"]):
        path = folder / file
        if not path.is_file():
            raise ConfigError(f"teacher cache shard {path} is missing; {_REBUILD}")
        try:
            shard = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as error:  # a truncated file fails to map
            reason = first_line(error)
            raise ConfigError(f"cannot read teacher cache shard {path} ({reason}); {_REBUILD}") from None
        rows = min(shard_size, num_samples - number * shard_size)
        if shard.shape != (rows, *field["shape"]):
            raise ConfigError(
                f"teacher cache shard {path} holds shape {shard.shape}, expected {(rows, *field['shape'])} "
                f"(cut short or edited); {_REBUILD}"
            )
        shards.append(shard)
    return shards


class CachedTeacher:
    """Replays a cache written by :func:`cache_teacher`; called like :class:`alambic.core.distiller.Teacher`.

    ``teacher`` and ``dataset``, when given, are checked against the manifest (checksum and
    fingerprint); ``terms`` are checked to ask only for what the cache stores.

    Example:
        >>> cached = CachedTeacher("cache/resnet56", teacher=teacher, dataset=train_set, terms=terms)
        >>> outputs = cached(images, index)  # {"logits": [B, C], ...}
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        teacher: nn.Module | None = None,
        dataset: Dataset | None = None,
        terms: Sequence[Any] = (),
        preload: bool | None = None,
    ) -> None:
        """``preload`` copies the whole cache into memory where the training runs (GPU memory on a GPU),
        so a batch's outputs are one indexing operation there: no reads from disk, no copy from the host
        and no host-device sync per step. ``None`` preloads caches up to ``PRELOAD_LIMIT`` bytes (1 GiB);
        ``False`` always reads the memory-mapped shards."""
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise ConfigError(
                f"{self.folder} is not a teacher cache (no manifest.json); write one with cache-teacher"
            )
        self.manifest = read_manifest(path)
        if teacher is not None and teacher_checksum(teacher) != self.manifest["teacher_checksum"]:
            raise ConfigError(
                f"{self.folder} was written by another teacher (its checksum differs from this teacher's "
                "weights); rebuild the cache with cache-teacher"
            )
        if dataset is not None:
            check_not_augmented(dataset)
            if dataset_fingerprint(dataset) != self.manifest["dataset_fingerprint"]:
                raise ConfigError(
                    f"{self.folder} was written for other training data (fingerprint differs: another "
                    "subset, order or normalisation); rebuild the cache with cache-teacher"
                )
        self.feature_paths = list(self.manifest["features"])
        self._check_terms(terms)
        self.vocab_size = self.manifest.get("vocab_size")
        # None: written before the axes were recorded, or by a teacher that could not run narrower
        self.token_axes: dict[str, list[int] | None] | None = self.manifest.get("token_axes")
        if self.token_axes is not None and "topk_log_probs" in self.token_axes:
            # the replayed logits have the top-k's token axes
            self.token_axes = {**self.token_axes, "logits": self.token_axes["topk_log_probs"]}
        self.shard_size = self.manifest["shard_size"]
        self.arrays = {
            name: _open_shards(self.folder, name, field, self.manifest["num_samples"], self.shard_size)
            for name, field in self.manifest["fields"].items()
        }
        self.device = torch.device("cpu")
        stored = sum(shard.nbytes for shards in self.arrays.values() for shard in shards)
        self.preload = stored <= PRELOAD_LIMIT if preload is None else preload
        self.resident: dict[str, Tensor] = {}  # name -> every sample's rows, on self.device

    def _check_terms(self, terms: Sequence[Any]) -> None:
        wanted = feature_paths([t for t in terms if get_loss_spec(t.loss).needs_teacher], "teacher")
        missing = sorted(set(wanted) - set(self.feature_paths))
        if missing:
            raise ConfigError(
                f"the terms compare teacher outputs {missing} that {self.folder} does not store "
                f"(it has logits{', ' + ', '.join(self.feature_paths) if self.feature_paths else ''}); "
                "rebuild it with --feature for each"
            )

    def to(self, device: torch.device | str) -> CachedTeacher:
        self.device = torch.device(device)
        if self.preload:
            self.resident = {
                name: torch.cat([torch.from_numpy(np.array(shard)) for shard in shards]).to(self.device)
                for name, shards in self.arrays.items()
            }
        return self

    def _rows(self, name: str, index: np.ndarray | Tensor) -> Tensor:
        """Rows ``index`` of field ``name``, in its stored dtype: on the device when preloaded, else on the host."""
        if self.resident:
            return self.resident[name][index]
        shards = index // self.shard_size
        first = self.arrays[name][0]
        out = np.empty((len(index), *first.shape[1:]), dtype=first.dtype)
        for shard in np.unique(shards):
            where = shards == shard
            out[where] = self.arrays[name][shard][index[where] - shard * self.shard_size]
        return torch.from_numpy(out)

    def __call__(self, inputs: Any, index: Tensor | None = None) -> dict[str, Tensor]:
        if index is None:
            raise ConfigError(
                "a cached teacher reads outputs by sample index; yield (inputs, labels, index) batches "
                "(alambic.data.IndexedDataset wraps a data set so)"
            )
        if self.resident:  # indexing on the device: no copy to the host, no sync
            rows = index.detach().to(self.device, torch.int64, non_blocking=True)
            if self.device.type == "cpu":
                low, high = torch.aminmax(rows)  # one pass over the indices
                self._check_range(int(low), int(high))
            else:  # checked on the device, without a sync (a negative index would wrap to wrong rows)
                inside = ((rows >= 0) & (rows < self.manifest["num_samples"])).all()
                torch._assert_async(inside, "sample index outside the teacher cache")
        else:
            rows = index.detach().cpu().numpy().astype(np.int64)
            self._check_range(int(rows.min()), int(rows.max()))
        outputs = {}
        for name in self.arrays:
            if name in ("topk_log_probs", "topk_ids", "tail_mass"):
                continue
            outputs[name] = self._rows(name, rows).to(self.device, torch.float32, non_blocking=True)
        if "topk_log_probs" in self.arrays:
            outputs["logits"] = self._dense(rows)
        return cut_to_width(outputs, inputs, self.token_axes, self.manifest.get("width"))

    def _check_range(self, low: int, high: int) -> None:
        if low < 0 or high >= self.manifest["num_samples"]:
            raise ConfigError(
                f"sample index {high if high >= 0 else low} is outside the cache's "
                f"{self.manifest['num_samples']} samples"
            )

    def _dense(self, rows: np.ndarray | Tensor) -> Tensor:
        """Top-k log-probabilities with the tail mass spread evenly over the other tokens."""
        values = self._rows("topk_log_probs", rows).to(self.device, torch.float32)  # [..., k]
        ids = self._rows("topk_ids", rows).to(self.device, torch.int64)  # [..., k]
        tail = self._rows("tail_mass", rows).to(self.device, torch.float32)  # [...]
        others = max(self.vocab_size - values.shape[-1], 1)
        fill = torch.log(tail.clamp_min(1e-12) / others).unsqueeze(-1)  # [..., 1]
        dense = fill.expand(*values.shape[:-1], self.vocab_size).clone()  # [..., V]
        return dense.scatter_(-1, ids, values)


PRELOAD_LIMIT = 2**30  # caches up to this size are held where training runs (see CachedTeacher)


def cache_size_bytes(folder: str | Path) -> int:
    """Bytes on disk of a cache folder."""
    return sum(path.stat().st_size for path in Path(folder).iterdir())


def epochs_to_pay_off(build_seconds: float, online_epoch: float, cached_epoch: float) -> float:
    """How many epochs a cache takes to pay for its build time (inf when it saves nothing per epoch)."""
    saved = online_epoch - cached_epoch
    return build_seconds / saved if saved > 0 else math.inf

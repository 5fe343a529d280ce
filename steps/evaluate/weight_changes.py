"""Does the scored model, in the evaluation dtype, differ from the model it was trained from?

Exports keep fp32 master weights; evaluation may cast them to bfloat16. A DPO update at lr 1e-8 is far below
bfloat16's resolution, so the cast model can be bit-identical to its init and every score would be the init's.
This counts the weight entries that differ after casting both models to the evaluation dtype, tensor by tensor
from their safetensors files (slices of big tensors at a time: never two models in memory), and says why where
none does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: At most this many entries of one tensor are read and compared at a time (64 MB per side in fp32).
CHUNK_ELEMENTS = 1 << 24
INDEX_FILE = "model.safetensors.index.json"
#: What a Hub init needs fetched (the weights and the files that name them), not the whole repository.
HUB_PATTERNS = ["*.safetensors", INDEX_FILE, "config.json"]


class WeightsUnavailable(ValueError):
    """A model whose weights cannot be compared file by file (built in memory, an adapter, no safetensors)."""


@dataclass(frozen=True)
class WeightChange:
    """How many of ``total`` weight entries differ from the init: as stored (``changed_stored``) and after both
    are cast to ``dtype`` (``changed``). ``note`` says why nothing differs, or why nothing was measured."""

    model: str
    init: str
    dtype: str
    changed: int | None = None
    changed_stored: int | None = None
    total: int | None = None
    tensors: int = 0
    only_in_model: list[str] = field(default_factory=list)
    note: str | None = None

    @property
    def share(self) -> float | None:
        """The share of entries that differ in ``dtype`` (None: not measured)."""
        return None if self.changed is None or not self.total else self.changed / self.total

    def record(self) -> dict[str, Any]:
        """What the evaluation result keeps (``weight_change`` in metrics.json)."""
        return {**asdict(self), "share": self.share}


def unchanged_reason(dtype: str, changed_stored: int) -> str:
    """Why no entry differs in ``dtype``: the update rounds away in it, or there was none at all."""
    if changed_stored > 0:
        return f"the update is below {dtype}'s resolution; evaluate in float32 (evaluation.dtype)"
    return "training left every weight exactly as it was (the update is zero even as stored)"


def weights_dir(spec: str) -> Path:
    """The directory holding ``spec``'s safetensors: a local directory, the embedded model's converted copy, or
    the Hub snapshot (fetched unless cached; HF_HUB_OFFLINE is honoured). WeightsUnavailable otherwise."""
    from steps.models import ensure_embedded_model, resolve_model_spec
    from steps.models.load import is_adapter_dir

    source = resolve_model_spec(spec)
    if source.kind == "local":
        if is_adapter_dir(source.path):
            raise WeightsUnavailable(f"{spec} is a LoRA adapter directory: it holds the adapter, not the weights")
        return source.path
    if source.kind == "embedded":
        return ensure_embedded_model(source.location)
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=HUB_PATTERNS))
    raise WeightsUnavailable(f"{spec} is a {source.kind} model built in memory: there are no weight files to compare")


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index when sharded)."""
    from safetensors import safe_open

    from steps.io import read_json

    index = directory / INDEX_FILE
    if index.is_file():
        return {name: directory / file for name, file in read_json(index)["weight_map"].items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightsUnavailable(f"{directory} has no .safetensors weights")
    names: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names.update(dict.fromkeys(handle.keys(), path))
    return names


def _chunks(handle: Any, name: str) -> Iterator[torch.Tensor]:
    """The tensor ``name`` in row slices of about :data:`CHUNK_ELEMENTS` entries."""
    view = handle.get_slice(name)
    shape = view.get_shape()
    if len(shape) == 0:
        yield handle.get_tensor(name)
        return
    per_row = max(1, int(_numel(shape[1:])))
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, shape[0], step):
        yield view[start : start + step]


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _differing(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, device: str) -> tuple[int, int]:
    """Entries that differ after casting both to ``dtype``, and as stored (compared in their common dtype)."""
    import torch

    a, b = a.to(device), b.to(device)
    common = torch.promote_types(a.dtype, b.dtype)
    stored = int(torch.count_nonzero(a.to(common) != b.to(common)))
    if common == dtype or not (a.is_floating_point() and b.is_floating_point()):
        return stored, stored
    return int(torch.count_nonzero(a.to(dtype) != b.to(dtype))), stored


def _compare_device() -> str:
    """Where slices are compared: the GPU when there is one (evaluation runs there, before it loads anything)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def count_changes(model_dir: Path, init_dir: Path, dtype: str, show_progress: bool = True) -> dict[str, Any]:
    """Counts over the tensors both directories hold: ``changed`` (in ``dtype``), ``changed_stored``, ``total``,
    ``tensors`` and ``only_in_model`` (names the init lacks, e.g. an untied output layer)."""
    import torch
    from safetensors import safe_open

    from steps.models.load import torch_dtype

    target = torch_dtype(dtype)
    device = _compare_device()
    model_names, init_names = weight_files(model_dir), weight_files(init_dir)
    shared = [name for name in model_names if name in init_names]
    if not shared:
        raise WeightsUnavailable(f"{model_dir} and {init_dir} share no tensor names")
    changed = changed_stored = total = 0
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def opened(path: Path) -> Any:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path]

        for name in tqdm(shared, desc="weights vs init", unit="tensor", disable=not show_progress):
            model_handle, init_handle = opened(model_names[name]), opened(init_names[name])
            model_shape, init_shape = (h.get_slice(name).get_shape() for h in (model_handle, init_handle))
            if list(model_shape) != list(init_shape):
                raise WeightsUnavailable(
                    f"tensor {name} has shape {model_shape} in the model, {init_shape} in the init"
                )
            for a, b in zip(_chunks(model_handle, name), _chunks(init_handle, name)):
                in_dtype, as_stored = _differing(a, b, target, device)
                changed, changed_stored, total = changed + in_dtype, changed_stored + as_stored, total + a.numel()
    if device == "cuda":  # the generation engine gets the whole GPU
        torch.cuda.empty_cache()
    only = sorted(set(model_names) - set(init_names))
    return {
        "changed": changed,
        "changed_stored": changed_stored,
        "total": total,
        "tensors": len(shared),
        "only_in_model": only,
    }


def weight_change(model: str, init: str, dtype: str, show_progress: bool = True) -> WeightChange:
    """The scored model ``model`` against ``init`` in the evaluation ``dtype``; never raises for a model that
    cannot be compared (the result's ``note`` says why). Logs the finding; a warning where nothing differs."""
    from steps.models import ModelSpecError

    try:
        counts = count_changes(weights_dir(model), weights_dir(init), dtype, show_progress)
    except (WeightsUnavailable, ModelSpecError, OSError) as exc:
        result = WeightChange(model, init, dtype, note=f"not measured: {exc}")
        logger.info("weights of %s vs its init %s in %s: %s", model, init, dtype, result.note)
        return result
    note = unchanged_reason(dtype, counts["changed_stored"]) if counts["changed"] == 0 else None
    result = WeightChange(model, init, dtype, note=note, **counts)
    (logger.warning if note else logger.info)(
        "weights of %s vs its init %s in %s: %d of %d entries differ (%.4f%%; %d as stored)%s",
        model,
        init,
        dtype,
        result.changed,
        result.total,
        100 * (result.share or 0.0),
        result.changed_stored,
        f": the scored model IS its init in {dtype}: {note}" if note else "",
    )
    return result

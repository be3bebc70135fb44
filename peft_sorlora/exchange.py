"""What travels between peers: the masked B values of one adapter, as a self-describing safetensors payload.

The first payload of a peer (round 0) carries its structure: the boolean masks, the layer shapes and, in the header,
the projection mode, seed and slot from which receivers regenerate A. The masks never change afterwards, so later
payloads carry the values only, in the row-major order of ``mask.nonzero()``: ``nnz × value bytes`` plus a small
header. Payloads are parsed with safetensors and JSON only; nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .calibration import solora_layers
from .config import PAYLOAD_DTYPES, PROJECTIONS

__all__ = [
    "FORMAT",
    "PayloadError",
    "SparseUpdate",
    "UpdateStats",
    "get_sparse_update",
    "apply_sparse_update",
    "config_fingerprint",
    "update_stats",
    "canonical_safetensors",
    "read_payload_metadata",
    "check_payload_header",
    "parse_json",
    "header_bound",
    "MAX_ABS_VALUE",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
]

FORMAT = "solora-sparse-update/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_REQUIRED = ("format", "base_model", "config_hash", "round", "dtype", "projection", "projection_seed", "slot", "r")
_INTEGERS = ("round", "projection_seed", "slot", "r")
MAX_ABS_VALUE = 1e4  # |B| entries beyond this are refused: trained B values are O(1e-2); 3e38 overflows outputs
MAX_HEADER_BYTES = 16 << 20  # safetensors' own cap is 100 MB; a payload's index of a few hundred tensors is ~100 KB
MAX_RANK = 4096


def header_bound(num_tensors: int) -> int:
    """The most bytes a payload's length prefix and JSON header may take for ``num_tensors`` tensors."""
    return 8 + 8192 + 512 * num_tensors


class PayloadError(ValueError):
    """A payload that is not a valid, compatible SO-LoRA sparse update (foreign, corrupted, NaN, mismatched).

    ``repo_id``/``revision`` name where it came from when a puller knows it (None otherwise)."""

    def __init__(self, message: str = "", *, repo_id: str | None = None, revision: str | None = None) -> None:
        super().__init__(message)
        self.repo_id, self.revision = repo_id, revision


MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, what: str = "JSON") -> object:
    """Parse untrusted JSON: at most ``max_bytes`` bytes and ``max_depth`` levels of nesting (checked before
    parsing, so a nesting bomb never reaches the recursive parser), UTF-8, no NaN/Infinity; :class:`PayloadError`
    naming ``what`` otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise PayloadError(f"{what} is {len(data)} bytes, over the {max_bytes}-byte limit")
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', data)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
        if deepest > max_depth:
            raise PayloadError(f"{what} nests deeper than {max_depth} levels: refused")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"{what} is not valid JSON: {exc}") from exc


def _peft_config(model: nn.Module, adapter_name: str):
    configs = getattr(model, "peft_config", None)
    if not configs or adapter_name not in configs:
        raise ValueError(f"model has no SO-LoRA adapter named {adapter_name!r}")
    return configs[adapter_name]


def config_fingerprint(model: nn.Module, adapter_name: str = "default") -> str:
    """Hash of what two peers must share for their updates to combine: rank, alpha, mode, layers and shapes.

    Seeds and slots are per peer and travel in the header; in orthogonal mode the shared seed is part of the hash
    (a different seed would break exact orthogonality).
    """
    config = _peft_config(model, adapter_name)
    layers = solora_layers(model, adapter_name)
    described = {
        "r": config.r,
        "lora_alpha": float(config.lora_alpha),
        "projection": config.projection,
        "projection_seed": config.projection_seed if config.projection == "orthogonal" else None,
        "layers": sorted([layer.layer_key, layer.out_features, layer.in_features] for layer in layers),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class UpdateStats:
    """Communication cost of one payload: parameters updated/transmitted and bytes on the wire."""

    params_updated: int
    params_transmitted: int
    bytes: int
    value_bytes: int

    @property
    def overhead_bytes(self) -> int:
        """Bytes beyond ``nnz × value bytes``: the safetensors header and, in round 0, the masks and shapes."""
        return self.bytes - self.value_bytes


@dataclass(frozen=True)
class SparseUpdate:
    """One peer's adapter update as it travels: masked B values per layer, plus (first exchange only) structure.

    ``values[key]`` is ``B[mask]`` of layer ``key`` (the module name in the base model), 1-D, row-major order.
    ``masks``/``shapes`` (``(out_features, r, in_features)``) are present when :attr:`has_structure`.
    ``metadata`` is the string header: format, base_model, config_hash, round, dtype, projection, projection_seed,
    slot, r, lora_alpha (and anything extra a caller adds).
    """

    values: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None = None
    shapes: dict[str, tuple[int, int, int]] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def has_structure(self) -> bool:
        """True when the payload carries masks and shapes (a peer's first exchange)."""
        return self.masks is not None

    @property
    def round(self) -> int:
        return int(self.metadata["round"])

    @property
    def base_model(self) -> str:
        return self.metadata["base_model"]

    @property
    def config_hash(self) -> str:
        return self.metadata["config_hash"]

    @property
    def num_values(self) -> int:
        """Transmitted parameters: the number of masked B values (nnz)."""
        return sum(int(v.numel()) for v in self.values.values())

    @property
    def structure(self) -> dict[str, torch.Tensor] | None:
        """What later (values-only) payloads of this peer are checked against: its masks (None without them)."""
        return self.masks

    @property
    def layout(self) -> dict[str, tuple[int, ...]] | None:
        """Layer key -> ``(out_features, r, in_features)`` when the payload carries structure."""
        return None if self.shapes is None else dict(sorted(self.shapes.items()))

    def max_bytes(self, *, structure: bool) -> int:
        """The most bytes a payload of the same peer may take: values-only (``structure=False``), exactly this
        payload's mask entries times the value size plus the header; with structure, any masks on these shapes."""
        if self.masks is None or self.shapes is None:
            raise ValueError("max_bytes needs a payload that carries its structure (round 0)")
        itemsize = torch.empty((), dtype=_DTYPES[self.metadata["dtype"]]).element_size()
        if not structure:
            return header_bound(len(self.masks)) + sum(int(m.sum()) for m in self.masks.values()) * itemsize
        entries = sum(out * r for out, r, _ in self.shapes.values())
        return header_bound(3 * len(self.masks)) + entries * (itemsize + 1) + 24 * len(self.masks)

    def fingerprint(self) -> str:
        """SHA-256 of the payload's bytes (what ``peer.json`` records and pullers check)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def stats(self) -> UpdateStats:
        """Communication cost of this payload (see :func:`update_stats`)."""
        return update_stats(self)

    def to_bytes(self) -> bytes:
        """Serialise as safetensors bytes, the header holding ``metadata``."""
        tensors: dict[str, torch.Tensor] = {f"values::{k}": v.contiguous() for k, v in self.values.items()}
        if self.masks is not None:
            for key, mask in self.masks.items():
                tensors[f"mask::{key}"] = mask.to(torch.bool).contiguous()
                tensors[f"shape::{key}"] = torch.tensor(self.shapes[key], dtype=torch.int64)
        metadata = dict(self.metadata, has_structure=str(self.has_structure).lower())
        return canonical_safetensors(save_safetensors(tensors, metadata=metadata))

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        expected_base_model: str | None = None,
        expected_config_hash: str | None = None,
        masks: dict[str, torch.Tensor] | None = None,
    ) -> SparseUpdate:
        """Parse and validate a payload; raise :class:`PayloadError` saying what is wrong.

        Refused: bytes that are not safetensors (truncated, corrupted), a foreign format tag, a missing or malformed
        header field (non-integer round/slot/seed/rank, unknown projection, non-finite or non-positive lora_alpha),
        a base model or config hash other than expected, NaN/Inf values or values beyond :data:`MAX_ABS_VALUE`,
        values whose count does not match the mask (the payload's own, or ``masks`` from the peer's round-0 payload
        for value-only payloads), masks or shapes that do not fit together.
        """
        metadata = check_payload_header(
            data,
            format=FORMAT,
            required=_REQUIRED,
            expected_base_model=expected_base_model,
            expected_config_hash=expected_config_hash,
            integers=_INTEGERS,
            positive_floats=("lora_alpha",),
        )
        if metadata["dtype"] not in PAYLOAD_DTYPES:
            raise PayloadError(f"payload dtype {metadata['dtype']!r} is not one of {PAYLOAD_DTYPES}")
        if metadata["projection"] not in PROJECTIONS:
            raise PayloadError(f"payload projection {metadata['projection']!r} is not one of {PROJECTIONS}")
        if not 1 <= int(metadata["r"]) <= MAX_RANK:
            raise PayloadError(f"payload rank r={metadata['r']} is outside [1, {MAX_RANK}]")
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise PayloadError(f"payload is not valid safetensors: {exc}") from exc
        values, own_masks, shapes = {}, {}, {}
        for name, tensor in sorted(tensors.items()):  # layer order must not depend on the file's order
            kind, _, key = name.partition("::")
            if kind == "values":
                values[key] = tensor
            elif kind == "mask":
                own_masks[key] = tensor
            elif kind == "shape":
                if tensor.dtype != torch.int64 or tuple(tensor.shape) != (3,) or bool((tensor <= 0).any()):
                    raise PayloadError(f"payload shape of layer {key!r} is not 3 positive integers")
                shapes[key] = tuple(int(x) for x in tensor.tolist())
            else:
                raise PayloadError(f"payload holds an unexpected tensor {name!r}")
        has_structure = metadata.get("has_structure") == "true"
        if has_structure != bool(own_masks):
            raise PayloadError("payload header and tensors disagree on whether masks are carried")
        reference = own_masks if has_structure else masks
        update = cls(
            values=values,
            masks=own_masks if has_structure else None,
            shapes=shapes if has_structure else None,
            metadata={k: v for k, v in metadata.items() if k != "has_structure"},
        )
        update.validate(masks=reference)
        return update

    def validate(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        """Check dtypes, finiteness and that each layer's value count matches its mask."""
        dtype = _DTYPES.get(self.metadata.get("dtype", ""), None)
        r = int(self.metadata.get("r", 0))
        for key, v in self.values.items():
            if v.ndim != 1:
                raise PayloadError(f"values of layer {key!r} must be 1-D, got shape {tuple(v.shape)}")
            if dtype is not None and v.dtype != dtype:
                raise PayloadError(f"values of layer {key!r} are {v.dtype}, header says {self.metadata['dtype']}")
            check_values(key, v)
        if self.masks is not None:
            if set(self.masks) != set(self.values) or set(self.shapes or {}) != set(self.values):
                raise PayloadError("payload masks, shapes and values name different layers")
            for key, mask in self.masks.items():
                shape = self.shapes[key]
                if mask.dtype != torch.bool:
                    raise PayloadError(f"layer {key!r}: mask is {mask.dtype}, expected torch.bool")
                if len(shape) != 3 or tuple(mask.shape) != (shape[0], shape[1]) or shape[1] != r:
                    raise PayloadError(f"layer {key!r}: mask shape {tuple(mask.shape)} does not match {shape}, r={r}")
        if masks is not None:
            if set(masks) != set(self.values):
                missing, extra = sorted(set(masks) - set(self.values)), sorted(set(self.values) - set(masks))
                raise PayloadError(
                    f"payload layers differ from the peer's masks: missing {missing}, unexpected {extra}"
                )
            for key, mask in masks.items():
                if int(mask.sum()) != self.values[key].numel():
                    raise PayloadError(
                        f"layer {key!r}: {self.values[key].numel()} values for a mask of {int(mask.sum())} entries"
                    )

    def dense_B(self, masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Layer key -> dense float32 B (``out_features x r``), zero outside the mask."""
        masks = masks if masks is not None else self.masks
        if masks is None:
            raise ValueError("dense_B needs the masks: pass the peer's round-0 masks for a value-only update")
        dense = {}
        for key, mask in masks.items():
            b = torch.zeros(mask.shape, dtype=torch.float32)
            b[mask] = self.values[key].float()
            dense[key] = b
        return dense


def check_values(key: str, values: torch.Tensor) -> None:
    """Refuse NaN/Inf and entries beyond :data:`MAX_ABS_VALUE` in one layer's values."""
    if not values.is_floating_point():
        raise PayloadError(f"values of layer {key!r} are {values.dtype}, not floating point")
    if not torch.isfinite(values).all():
        raise PayloadError(f"values of layer {key!r} contain NaN or Inf")
    if values.numel() and float(values.abs().max()) > MAX_ABS_VALUE:
        raise PayloadError(f"values of layer {key!r} reach {float(values.abs().max()):.3g}, beyond the "
                           f"{MAX_ABS_VALUE:g} bound")  # fmt: skip


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors bytes with the JSON header's keys sorted, so equal content gives equal bytes.

    safetensors writes its header (tensor index and metadata) from hash maps, whose order varies between processes;
    the tensor data and offsets are untouched, and the header stays padded to 8 bytes.
    """
    (length,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data[8 + length :]


def check_payload_header(
    data: bytes,
    *,
    format: str,
    required: tuple[str, ...] = (),
    expected_base_model: str | None = None,
    expected_config_hash: str | None = None,
    integers: tuple[str, ...] = (),
    positive_floats: tuple[str, ...] = (),
) -> dict[str, str]:
    """Read a payload's header and refuse a foreign format, missing fields, or another base model / config hash;
    ``integers`` must be decimal integers >= 0 and ``positive_floats`` (when present) finite numbers > 0."""
    metadata = read_payload_metadata(data)
    for key in integers:
        if key in metadata and not (metadata[key].isascii() and metadata[key].isdigit() and len(metadata[key]) < 19):
            raise PayloadError(f"payload header field {key}={metadata[key][:40]!r} is not an integer >= 0")
    for key in positive_floats:
        if key in metadata:
            try:
                number = float(metadata[key])
            except ValueError:
                number = float("nan")
            if not (math.isfinite(number) and number > 0):
                raise PayloadError(f"payload header field {key}={metadata[key][:40]!r} is not a finite number > 0")
    if metadata.get("format") != format:
        raise PayloadError(f"foreign payload: format tag {metadata.get('format')!r}, expected {format!r}")
    missing = [k for k in required if k not in metadata]
    if missing:
        raise PayloadError(f"payload header lacks {missing}")
    if expected_base_model is not None and metadata.get("base_model") != expected_base_model:
        raise PayloadError(
            f"payload is for base model {metadata.get('base_model')!r}, expected {expected_base_model!r}"
        )
    if expected_config_hash is not None and metadata.get("config_hash") != expected_config_hash:
        raise PayloadError(
            f"payload config hash {metadata.get('config_hash')!r} differs from ours {expected_config_hash!r} "
            "(rank, alpha, projection mode/seed or adapted layers differ)"
        )
    return metadata


def read_payload_metadata(data: bytes) -> dict[str, str]:
    """The string header (``__metadata__``) of a safetensors payload, read as JSON without loading tensors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) < 8:
        raise PayloadError(f"payload too short ({len(data)} bytes) to be safetensors")
    (length,) = struct.unpack("<Q", bytes(data[:8]))
    if length > len(data) - 8:
        raise PayloadError(f"payload truncated: header claims {length} bytes, {len(data) - 8} present")
    try:
        header = parse_json(bytes(data[8 : 8 + length]), max_bytes=MAX_HEADER_BYTES, what="payload header")
    except PayloadError as exc:
        raise PayloadError(f"payload header refused (not JSON or nested/large beyond bounds): {exc}") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise PayloadError("foreign payload: no safetensors metadata header")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise PayloadError("payload metadata must map strings to strings")
    return dict(metadata)


def get_sparse_update(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    round: int = 0,
    include_structure: bool | None = None,
    dtype: str | None = None,
) -> SparseUpdate:
    """The masked B values of ``adapter_name`` (with masks and shapes when ``include_structure``, default round 0)."""
    config = _peft_config(model, adapter_name)
    if config.layer_sparsity is None:
        raise ValueError(f"adapter {adapter_name!r} has no frozen masks yet: run peft_sorlora.calibrate first")
    dtype = dtype or config.payload_dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {PAYLOAD_DTYPES}, got {dtype!r}")
    structure = round == 0 if include_structure is None else include_structure
    values, masks, shapes = {}, {}, {}
    for layer in solora_layers(model, adapter_name):
        mask = layer.solora_mask[adapter_name].detach().cpu()
        values[layer.layer_key] = layer.solora_B[adapter_name].detach().cpu()[mask].to(_DTYPES[dtype]).contiguous()
        masks[layer.layer_key] = mask.clone()
        shapes[layer.layer_key] = (layer.out_features, layer.r[adapter_name], layer.in_features)
    metadata = {
        "format": FORMAT,
        "base_model": str(config.base_model_name_or_path or ""),
        "config_hash": config_fingerprint(model, adapter_name),
        "round": str(int(round)),
        "dtype": dtype,
        "projection": config.projection,
        "projection_seed": str(config.projection_seed),
        "slot": str(config.slot),
        "r": str(config.r),
        "lora_alpha": str(float(config.lora_alpha)),
    }
    return SparseUpdate(
        values=values, masks=masks if structure else None, shapes=shapes if structure else None, metadata=metadata
    )


def _check_base_model(model: nn.Module, update: SparseUpdate, adapter_name: str | None) -> None:
    """Refuse a payload made for another base model than the receiver's adapter (or any adapter) was made for."""
    configs = model.peft_config
    config = configs.get(adapter_name) if adapter_name in configs else next(iter(configs.values()))
    ours = str(getattr(config, "base_model_name_or_path", None) or "")
    if ours and update.base_model != ours:
        raise PayloadError(f"payload is for base model {update.base_model!r}, this model is {ours!r}")


def _add_adapter_from_update(model: nn.Module, update: SparseUpdate, adapter_name: str) -> None:
    """Add ``adapter_name`` from the payload's structure, its header checked against the receiver first."""
    if not update.has_structure:
        raise PayloadError(
            f"cannot create adapter {adapter_name!r} from a value-only payload: need its round-0 payload"
        )
    if not hasattr(model, "add_adapter") or not getattr(model, "peft_config", None):
        raise ValueError("apply_sparse_update(create=True) needs a PeftModel that already has an SO-LoRA adapter")
    _check_base_model(model, update, None)
    reference = next(iter(model.peft_config.values()))
    config = copy.deepcopy(reference)
    try:
        config.projection = update.metadata["projection"]
        config.projection_seed = int(update.metadata["projection_seed"])
        config.slot = int(update.metadata["slot"])
        config.r = int(update.metadata["r"])
        config.lora_alpha = float(update.metadata.get("lora_alpha", config.lora_alpha))
        if not (math.isfinite(config.lora_alpha) and config.lora_alpha > 0):
            raise ValueError(f"lora_alpha {config.lora_alpha} is not a finite number > 0")
        config.target_modules = sorted(update.values)
        config.layers_to_transform, config.layers_pattern = None, None
        config.layer_sparsity = {k: float(m.float().mean()) for k, m in update.masks.items()}
        config.inference_mode = True
        config.__post_init__()
    except (KeyError, ValueError, TypeError) as exc:
        raise PayloadError(f"payload header cannot make an adapter here: {exc}") from exc
    try:
        model.add_adapter(adapter_name, config)
    except (ValueError, KeyError, RuntimeError) as exc:
        if adapter_name in model.peft_config:
            model.delete_adapter(adapter_name)
        raise PayloadError(f"payload cannot make adapter {adapter_name!r} on this model: {exc}") from exc


@torch.no_grad()
def apply_sparse_update(
    model: nn.Module, update: SparseUpdate, adapter_name: str = "default", *, create: bool = False
) -> None:
    """Write ``update``'s values into the B of ``adapter_name`` at its mask (masks replaced if carried).

    All or nothing: the whole payload is checked first (base model, config hash, layers, mask shapes against the
    layers, value counts, finiteness and bounds), then applied; a refused payload leaves the model as it was, and
    with ``create=True`` a missing adapter is first added from the payload's structure (A regenerated from the
    projection mode, seed and slot) and removed again if the payload is refused. Payload problems raise
    :class:`PayloadError`.
    """
    configs = getattr(model, "peft_config", {})
    created = False
    if adapter_name not in configs:
        if not create:
            raise ValueError(f"model has no adapter {adapter_name!r} (pass create=True to add it from the payload)")
        _add_adapter_from_update(model, update, adapter_name)
        created = True
    try:
        layers = _checked_layers(model, update, adapter_name)
    except BaseException:
        if created:
            model.delete_adapter(adapter_name)
        raise
    for key, layer in layers.items():  # nothing below can refuse the payload: it is applied whole
        if update.masks is not None:
            layer.set_mask(adapter_name, update.masks[key])
        b = layer.solora_B[adapter_name]
        mask = layer.solora_mask[adapter_name]
        b.zero_()
        b[mask] = update.values[key].to(device=b.device, dtype=b.dtype)
    if update.masks is not None and configs[adapter_name].layer_sparsity is None:
        configs[adapter_name].layer_sparsity = {k: float(m.float().mean()) for k, m in update.masks.items()}


def _checked_layers(model: nn.Module, update: SparseUpdate, adapter_name: str) -> dict:
    """The adapter's layers by key, once every check of ``update`` against them passed (PayloadError otherwise)."""
    _check_base_model(model, update, adapter_name)
    ours = config_fingerprint(model, adapter_name)
    if update.config_hash != ours:
        raise PayloadError(
            f"payload config hash {update.config_hash!r} differs from adapter {adapter_name!r} ({ours!r})"
        )
    layers = {layer.layer_key: layer for layer in solora_layers(model, adapter_name)}
    if set(layers) != set(update.values):
        raise PayloadError(
            f"payload layers differ from adapter {adapter_name!r}: {sorted(set(layers) ^ set(update.values))[:5]}"
        )
    for key, layer in layers.items():
        expected = (layer.out_features, layer.r[adapter_name])
        if update.masks is not None and (
            tuple(update.masks[key].shape) != expected or update.masks[key].dtype != torch.bool
        ):
            raise PayloadError(f"layer {key!r}: payload mask {tuple(update.masks[key].shape)} does not fit {expected}")
    masks = update.masks or {k: layer.solora_mask[adapter_name].cpu() for k, layer in layers.items()}
    update.validate(masks=masks)
    return layers


def update_stats(update: SparseUpdate) -> UpdateStats:
    """Parameters updated (masked entries trained), transmitted (values sent) and bytes of ``update``."""
    nnz = update.num_values
    itemsize = torch.empty((), dtype=_DTYPES[update.metadata["dtype"]]).element_size()
    return UpdateStats(
        params_updated=nnz, params_transmitted=nnz, bytes=len(update.to_bytes()), value_bytes=nnz * itemsize
    )

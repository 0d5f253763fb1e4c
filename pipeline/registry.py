"""The model registry: versioned, checksummed model directories and an atomic CURRENT pointer.

Layout: `root/<version>/{model.safetensors, config.json, items.json, text_vectors.npy?,
metrics.json, manifest.json}` and `root/CURRENT`. A version is built in a temp dir and renamed
into place (manifest written last), so readers never see half a version. Loading verifies
checksums, shapes and finite weights and never unpickles. Old versions are kept for rollback.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import ModelRejected, RegistryError
from pipeline.files import FILE_MODE, atomic_write, fsync_dir, private_dirs
from pipeline.items import Catalog
from pipeline.messages import ModelUpdate
from pipeline.model import SeqRecConfig, SeqRecModel

__all__ = ["ModelRegistry", "LoadedModel"]

_VERSION_RE = re.compile(r"^v\d{6}$")
_WEIGHTS = "model.safetensors"
_REQUIRED = (_WEIGHTS, "config.json", "items.json", "metrics.json")
_FORMAT = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode("utf-8"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelRejected(f"cannot read {path}: {exc}") from exc


@dataclass(frozen=True)
class LoadedModel:
    """A verified model version, ready to serve (model in eval mode, on CPU unless moved).

    `item_ids[i]` is the id of model id row i + 1; `item_index` maps id → row. `catalog_meta`
    is the catalog at training time (ids/titles/categories/available lists), `text_vectors`
    its (N, 384) text vectors when they were published.
    """

    version: str
    model: SeqRecModel
    seq_config: SeqRecConfig
    item_ids: tuple[str, ...]
    item_index: dict[str, int]
    catalog_meta: dict[str, list[Any]]
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    text_vectors: np.ndarray | None = field(default=None, repr=False)

    def catalog(self) -> Catalog:
        """The catalog as published (needs text_vectors) – a cold start for a fresh worker."""
        if self.text_vectors is None:
            raise RegistryError(f"version {self.version} was published without text_vectors")
        meta = self.catalog_meta
        return Catalog.from_state({**meta, "text_vectors": self.text_vectors})

    @functools.cached_property
    def repeat_bias(self) -> float:
        """The model's learned score offset for items already in a user's history (0 if none)."""
        return float(self.model.repeat_offset().detach().float().cpu())

    @functools.cached_property
    def unknown_item_vector(self) -> np.ndarray:
        """The vector of an item known to no catalog (id row 0, zero text) → (D,)."""
        device = next(self.model.parameters()).device
        ids = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        text = torch.zeros(1, self.seq_config.text_dim, device=device)  # (1, T)
        with torch.no_grad():
            return self.model.item_vectors(ids, text)[0].float().cpu().numpy()  # (D,)


class ModelRegistry:
    """Versioned model store under `root`. Constructing it does no I/O."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- reading --------------------------------------------------------------------------
    def current_version(self) -> str | None:
        """The version CURRENT points at, or None before the first publish."""
        try:
            text = (self.root / "CURRENT").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(f"cannot read {self.root / 'CURRENT'}: {exc}") from exc
        return self._check_version(text) if text else None

    def versions(self) -> list[dict[str, Any]]:
        """Complete versions (manifest present), oldest first, with their manifest summary."""
        if not self.root.is_dir():
            return []
        current = self.current_version()
        out = []
        for path in sorted(self.root.iterdir()):
            if not _VERSION_RE.match(path.name) or not (path / "manifest.json").is_file():
                continue
            try:
                manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            out.append(
                {
                    "version": path.name,
                    "current": path.name == current,
                    "created_at": manifest.get("created_at"),
                    "parent_version": manifest.get("parent_version"),
                    "trained_on_events": manifest.get("trained_on_events"),
                    "metrics": manifest.get("metrics", {}),
                    "uri": self._uri(path.name),
                }
            )
        return out

    def resolve_uri(self, uri: str) -> str:
        """The version a ModelUpdate.uri names; raises RegistryError for anything outside root."""
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
        elif parsed.scheme == "":
            path = Path(uri)
        else:
            raise RegistryError(f"unsupported model uri scheme {parsed.scheme!r} in {uri!r}")
        if not path.is_absolute():
            path = self.root / path
        try:
            resolved = path.resolve(strict=False)
            root = self.root.resolve(strict=False)
        except OSError as exc:
            raise RegistryError(f"cannot resolve model uri {uri!r}: {exc}") from exc
        if resolved.parent != root:
            raise RegistryError(f"model uri {uri!r} is outside the registry {root}")
        return self._check_version(resolved.name)

    def load(self, version: str | None = None, device: str = "cpu") -> LoadedModel:
        """Load and verify a version (default: CURRENT).

        Raises RegistryError (no such/incomplete version, bad name) or ModelRejected (checksum
        mismatch, not safetensors, wrong keys/shapes, non-finite weights, inconsistent items).
        """
        if version is None:
            version = self.current_version()
            if version is None:
                raise RegistryError(f"registry {self.root} has no CURRENT version")
        path = self._version_dir(version)
        manifest = self._verify_manifest(path)
        try:
            seq_config = SeqRecConfig.from_dict(_read_json(path / "config.json")["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelRejected(f"{version}: invalid config.json: {exc}") from exc
        items = _read_json(path / "items.json")
        item_ids = tuple(str(i) for i in items.get("item_ids", []))
        if len(item_ids) != seq_config.num_items:
            raise ModelRejected(
                f"{version}: items.json lists {len(item_ids)} item ids but the "
                f"model has num_items={seq_config.num_items}"
            )
        model = self._load_weights(path, version, seq_config, device)
        text_vectors = None
        if (path / "text_vectors.npy").is_file():
            try:
                text_vectors = np.load(path / "text_vectors.npy", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ModelRejected(f"{version}: unreadable text_vectors.npy: {exc}") from exc
            n = len(items.get("catalog", {}).get("ids", []))
            if (
                text_vectors.shape != (n, seq_config.text_dim)
                or not np.isfinite(text_vectors).all()
            ):
                raise ModelRejected(
                    f"{version}: text_vectors.npy has shape {text_vectors.shape}, "
                    f"expected ({n}, {seq_config.text_dim}) finite values"
                )
        return LoadedModel(
            version=version,
            model=model,
            seq_config=seq_config,
            item_ids=item_ids,
            item_index={item_id: row + 1 for row, item_id in enumerate(item_ids)},
            catalog_meta=items.get("catalog", {}),
            metrics=_read_json(path / "metrics.json"),
            manifest=manifest,
            text_vectors=text_vectors,
        )

    # --- writing --------------------------------------------------------------------------
    def publish(
        self,
        model: SeqRecModel,
        seq_config: SeqRecConfig,
        item_ids: Sequence[str],
        catalog_meta: Mapping[str, Sequence[Any]] | None,
        metrics: Mapping[str, Any],
        parent_version: str | None,
        trained_on_events: int,
        text_vectors: np.ndarray | None = None,
        *,
        make_current: bool = True,
        now_ms: int | None = None,
    ) -> ModelUpdate:
        """Write a new version atomically and (by default) point CURRENT at it.

        item_ids[i] is the id of model id row i + 1 (len == seq_config.num_items); catalog_meta
        is `Catalog.meta()` (ids/titles/categories/available), text_vectors (N, T) aligned with
        its ids. Returns the ModelUpdate announcing it. Raises RegistryError on I/O failure.
        """
        if len(item_ids) != seq_config.num_items:
            raise RegistryError(
                f"{len(item_ids)} item ids for a model with num_items={seq_config.num_items}"
            )
        created_at = int(time.time() * 1000) if now_ms is None else int(now_ms)
        clean_metrics = {
            k: (None if v is None or not np.isfinite(float(v)) else float(v))
            for k, v in metrics.items()
        }
        meta = {k: list(v) for k, v in (catalog_meta or {}).items()}
        try:
            private_dirs(self.root, own=True)
            tmp = private_dirs(self.root / f".tmp-{uuid.uuid4().hex}")
            state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / _WEIGHTS), metadata={"format": "streamrec-seqrec"})
            _write_json(tmp / "config.json", {"format": _FORMAT, "model": seq_config.to_dict()})
            _write_json(tmp / "items.json", {"item_ids": list(item_ids), "catalog": meta})
            _write_json(tmp / "metrics.json", clean_metrics)
            if text_vectors is not None:
                buffer = io.BytesIO()
                np.save(buffer, np.asarray(text_vectors, dtype=np.float32), allow_pickle=False)
                atomic_write(tmp / "text_vectors.npy", buffer.getvalue())
            for p in tmp.iterdir():  # safetensors creates its file itself, through the umask
                os.chmod(p, FILE_MODE)
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
            manifest = {
                "format": _FORMAT,
                "files": files,
                "created_at": created_at,
                "parent_version": parent_version,
                "trained_on_events": int(trained_on_events),
                "metrics": clean_metrics,
            }
            _write_json(tmp / "manifest.json", manifest)
            fsync_dir(tmp)
            version = self._rename_into_place(tmp)
            if make_current:
                self._set_current(version)
        except OSError as exc:
            raise RegistryError(f"cannot publish into {self.root}: {exc}") from exc
        return ModelUpdate(
            version=version,
            uri=self._uri(version),
            created_at=created_at,
            parent_version=parent_version,
            metrics=clean_metrics,
            trained_on_events=int(trained_on_events),
        )

    def rollback(self, version: str) -> None:
        """Point CURRENT at an existing, verified version; every version stays on disk."""
        self.load(version)
        self._set_current(self._check_version(version))

    # --- helpers ----------------------------------------------------------------------------
    def _check_version(self, version: str) -> str:
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise RegistryError(
                f"invalid model version {version!r} (expected v followed by "
                f"6 digits, inside {self.root})"
            )
        return version

    def _version_dir(self, version: str) -> Path:
        path = self.root / self._check_version(version)
        if not path.is_dir():
            raise RegistryError(f"no model version {version} in {self.root}")
        return path

    def _uri(self, version: str) -> str:
        return (self.root / version).resolve().as_uri()

    def _rename_into_place(self, tmp: Path) -> str:
        # Two publishers racing for one number: the loser's rename fails and it takes the next.
        for _ in range(1000):
            taken = [int(p.name[1:]) for p in self.root.iterdir() if _VERSION_RE.match(p.name)]
            version = f"v{max(taken, default=0) + 1:06d}"
            try:
                os.rename(tmp, self.root / version)
            except OSError:
                if (self.root / version).exists():
                    continue
                raise
            fsync_dir(self.root)
            return version
        raise RegistryError(f"could not allocate a version number in {self.root}")

    def _set_current(self, version: str) -> None:
        atomic_write(self.root / "CURRENT", (version + "\n").encode())

    def _verify_manifest(self, path: Path) -> dict[str, Any]:
        version = path.name
        if not (path / "manifest.json").is_file():
            raise RegistryError(f"version {version} is incomplete (no manifest.json)")
        manifest = _read_json(path / "manifest.json")
        if not isinstance(manifest, dict):
            raise ModelRejected(f"{version}: manifest.json is not an object")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise ModelRejected(f"{version}: manifest.json has no file list")
        missing = [name for name in _REQUIRED if name not in files]
        if missing:
            raise ModelRejected(f"{version}: manifest does not cover {missing}")
        for name, expected in files.items():
            if "/" in name or "\\" in name or name in {".", ".."}:
                raise ModelRejected(
                    f"{version}: manifest names a path outside the version: {name!r}"
                )
            file = path / name
            if not file.is_file():
                raise ModelRejected(f"{version}: {name} is missing")
            actual = _sha256(file)
            if actual != expected:
                raise ModelRejected(
                    f"{version}: checksum mismatch for {name} "
                    f"(manifest {expected[:12]}…, file {actual[:12]}…)"
                )
        return manifest

    def _load_weights(
        self, path: Path, version: str, seq_config: SeqRecConfig, device: str
    ) -> SeqRecModel:
        try:
            state = load_file(str(path / _WEIGHTS), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelRejected(
                f"{version}: {_WEIGHTS} is not a valid safetensors file "
                f"(pickles are refused): {exc}"
            ) from exc
        model = SeqRecModel(seq_config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ModelRejected(
                f"{version}: weights do not match the config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ModelRejected(
                    f"{version}: {name} has shape {tuple(tensor.shape)}, "
                    f"config expects {tuple(expected[name].shape)}"
                )
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ModelRejected(f"{version}: {name} holds non-finite values")
        model.load_state_dict(state, strict=True)
        return model.to(torch.device(device)).eval()

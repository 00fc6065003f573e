"""Training checkpoints through torch.distributed.checkpoint (DCP): sharded, resharded on load, written atomically.

    checkpoints/
      latest                        name of the newest complete checkpoint
      step-0000006/
        .metadata, __R_0.distcp     DCP: model.*, optim.*, ema.* (every rank writes its own shards)
        train_state.pt              step, epoch, data position, scheduler, scaler, world size, config (rank 0)
        rng-00000.pt, ...           every rank's RNG state
        manifest.json               every file's size and CRC-32 (each rank's own files, checksummed by that rank), written last

Each checkpoint is written into .step-NNNNNNN.partial/ and renamed when complete, then `latest` is moved to it, so a
crash or kill mid-save leaves the previous checkpoint (and `latest`) intact. A folder without manifest.json, or
whose files do not match it (missing, truncated, or corrupt: a CRC-32 differs), is refused with a one-line
CheckpointError before DCP reads it (on resume the ranks split the checksums between them); manifests written before
the checksums are checked by size only. A loaded tensor holding a NaN or an infinity (never saved: train.py refuses
to write one) is refused too. Reading never unpickles code.
"""
import io
import json
import logging
import os
import pickle
import re
import shutil
import warnings
import zlib
from contextlib import contextmanager
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import set_element  # DCP's own helper
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from opendit.checkpoint.layout import LATEST, MANIFEST, STEP_PATTERN, TRAIN_STATE, rng_state, torch_load
from opendit.errors import CheckpointError
from opendit.parallel.mesh import local_shard
from opendit.parallel.process import barrier

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)  # optimizer keys by parameter name: reshardable
RNG_FILE = "rng-{:05d}.pt"  # one per rank
CHUNK = 16 << 20  # bytes per read when checksumming
_VERIFIED: Dict[str, tuple] = {}  # folder -> its files' stat when their checksums last matched (one read per process)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load; one process is a normal case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# --- reading without unpickling code ---------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata, allowing only DCP's metadata classes, torch sizes/dtypes and plain containers."""

    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
               ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class SafeReader(dcp.FileSystemReader):
    """A FileSystemReader whose metadata is unpickled with an allow-list (tensors are already read weights-only)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner with non-tensor values (optimizer hyper-parameters) read by torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def file_crc32(path: str) -> str:
    """zlib's CRC-32 of a file as 8 hex digits, read in 16 MiB chunks (~2 GB/s on one CPU core)."""
    crc, buffer = 0, bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _read_manifest(path: str) -> Tuple[Dict[str, int], Dict[str, str]]:
    """(sizes, CRC-32s) of manifest.json; the CRC-32s are empty in checkpoints written before they were recorded."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST}; the save did not finish)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        sizes, crcs = manifest["files"], manifest.get("crc32", {})
        if not isinstance(sizes, dict) or not isinstance(crcs, dict):
            raise TypeError("files and crc32 must be objects")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({type(e).__name__})") from None
    return sizes, crcs


def _stat_signature(path: str, names) -> tuple:
    stats = [os.stat(os.path.join(path, name)) for name in (MANIFEST, *sorted(names))]
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def _verify(path: str, share: Tuple[int, int]) -> Tuple[str, tuple]:
    """verify_checkpoint's checks, the checksums of this share (index, count) of the files only: largest first in turn,
    the sizes always all. -> (folder key, its files' stat signature) for _VERIFIED."""
    sizes, crcs = _read_manifest(path)
    for name, size in sizes.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: incomplete checkpoint ({name} is missing)")
        if os.path.getsize(file) != size:
            raise CheckpointError(f"{path}: truncated checkpoint ({name} has {os.path.getsize(file)} bytes, expected {size})")
    key, signature = os.path.realpath(path), _stat_signature(path, sizes)
    if _VERIFIED.get(key) == signature:  # checksummed already (by this process, or all of it by the ranks together)
        return key, signature
    index, count = share
    mine = sorted((n for n in crcs if n in sizes), key=lambda n: (-sizes[n], n))[index::count]
    for name in sorted(mine, key=lambda n: sizes[n]):  # small files first
        crc = file_crc32(os.path.join(path, name))
        if crc != crcs[name]:
            raise CheckpointError(f"{path}: corrupt checkpoint ({name}: CRC-32 {crc}, {MANIFEST} recorded {crcs[name]})")
    return key, signature


def verify_checkpoint(path: str) -> None:
    """Refuse, in one line, a folder that is not a finished, intact checkpoint: no manifest, a missing or truncated
    file, or a corrupt one (its CRC-32 differs from the manifest's; sizes only for manifests without CRC-32s)."""
    key, signature = _verify(path, (0, 1))
    _VERIFIED[key] = signature


def _first_on_any_rank(value: Optional[str]) -> Optional[str]:
    """The first rank's non-empty value (an error, a tensor's name), on every rank; all ranks call it together."""
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, value)
    return next((v for v in found if v), None)


def verify_checkpoint_on_all_ranks(path: str) -> None:
    """verify_checkpoint, called by every rank together: each checksums its share of the files, and all raise the
    same one-line error if any share fails. One process: verify_checkpoint."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return verify_checkpoint(path)
    error, verified = None, None
    try:
        verified = _verify(path, (dist.get_rank(), dist.get_world_size()))
    except CheckpointError as e:
        error = str(e)
    error = _first_on_any_rank(error)
    if error:
        raise CheckpointError(error)
    key, signature = verified
    _VERIFIED[key] = signature  # so the loads that follow do not read it again


def read_tensors(path: str, prefix: str) -> Dict[str, torch.Tensor]:
    """All tensors under `prefix.` (e.g. the EMA) as full CPU tensors, on this process alone (no process group)."""
    verify_checkpoint(path)
    reader = SafeReader(path)
    try:
        metadata = reader.read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})".split("\n")[0]) from None
    head = prefix + "."
    state = {
        key[len(head) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(head) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"{path}: holds no '{prefix}' weights")
    _load({prefix: state}, path, no_dist=True)
    _refuse_non_finite({prefix: state}, path, collective=False)
    return state


def _load(state: Dict[str, Any], path: str, no_dist: bool = False) -> None:
    check_metadata(path)
    dcp_logger = logging.getLogger("torch.distributed.checkpoint")  # DCP logs every failure with its traceback
    level, dcp_logger.level = dcp_logger.level, logging.CRITICAL + 1
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # a corrupt shard, a foreign file, a shape that does not fit
        if isinstance(e, CheckpointException) and e.failures:  # DCP gathers every rank's failure
            e = next(iter(e.failures.values()))[0]  # (exception, traceback)
        reason = str(e).strip().split("\n")[0][:300]
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {reason})") from None
    finally:
        dcp_logger.setLevel(level)


def _leaves(tree: Dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _refuse_non_finite(state: Dict[str, Any], path: str, collective: bool) -> None:
    """A loaded tensor holding a NaN or an infinity means corruption (train.py never saves one); each rank checks its
    own shards and, when collective, every rank learns the verdict, so all stop together."""
    bad = next((key for key, value in _leaves(state) if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(local_shard(value)).all())), None)
    if collective:
        bad = _first_on_any_rank(bad)
    if bad:
        raise CheckpointError(f"{path}: corrupt checkpoint ({bad} holds NaN or infinite values, which are never saved)")


# --- training state ------------------------------------------------------------------------------
def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema) -> Dict[str, Any]:
    """What DCP writes and reads: model, optimizer and EMA state dicts, DTensors left sharded."""
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    return {"model": model_state, "optim": optim_state, "ema": ema.state_dict()}


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _own_files(folder: str, rank: int) -> Dict[str, Tuple[int, str]]:
    """(size, CRC-32) of the files this rank wrote (its DCP shard and RNG state; rank 0 also .metadata and
    train_state.pt), read back locally: on a shared file system another node's directory listing may lag behind."""
    mine = [name for name in os.listdir(folder) if name.startswith(f"__{rank}_") or name == RNG_FILE.format(rank)]
    mine += [".metadata", TRAIN_STATE] if rank == 0 else []
    return {name: (os.path.getsize(os.path.join(folder, name)), file_crc32(os.path.join(folder, name))) for name in mine}


def _write_manifest(folder: str, files: Dict[str, Tuple[int, str]]) -> None:
    """manifest.json, written atomically and synced: its presence marks the checkpoint complete."""
    path = os.path.join(folder, MANIFEST)
    files = dict(sorted(files.items()))
    with open(f"{path}.tmp", "w") as f:
        json.dump({"files": {name: size for name, (size, _) in files.items()}, "crc32": {name: crc for name, (_, crc) in files.items()}}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def _publish(checkpoint_dir: str, name: str, tmp: str) -> None:
    """Rename the finished folder into place (an older copy of the same step is moved aside first), then move `latest`."""
    final = os.path.join(checkpoint_dir, name)
    old = os.path.join(checkpoint_dir, f".{name}.old")
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    pointer = os.path.join(checkpoint_dir, f".{LATEST}.tmp")
    with open(pointer, "w") as f:
        f.write(name + "\n")
    os.replace(pointer, os.path.join(checkpoint_dir, LATEST))
    shutil.rmtree(old, ignore_errors=True)


def _prune(checkpoint_dir: str, keep: int, newest: str) -> None:
    """Delete all but the `keep` newest step folders (keep <= 0: keep all) and leftovers of interrupted saves."""
    for entry in os.listdir(checkpoint_dir):
        if entry.startswith(".step-") and entry.endswith((".partial", ".old")):
            shutil.rmtree(os.path.join(checkpoint_dir, entry), ignore_errors=True)
    if keep <= 0:
        return
    steps = sorted(entry for entry in os.listdir(checkpoint_dir) if re.fullmatch(STEP_PATTERN, entry))
    for entry in steps[:-keep]:
        if entry != newest:
            shutil.rmtree(os.path.join(checkpoint_dir, entry), ignore_errors=True)


def save_checkpoint(checkpoint_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema, train_state: Dict[str, Any], keep: int = 3) -> str:
    """Write checkpoints/step-{step}/ from every rank (see the module docstring); returns its path."""
    rank = _rank()
    name = f"step-{step:07d}"
    tmp = os.path.join(checkpoint_dir, f".{name}.partial")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    with _quiet_single_process():
        dcp.save(sharded_state(model, optimizer, ema), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    _atomic_torch_save(rng_state(), os.path.join(tmp, RNG_FILE.format(rank)))
    if rank == 0:
        _atomic_torch_save(train_state, os.path.join(tmp, TRAIN_STATE))
    mine = _own_files(tmp, rank)  # every rank checksums what it wrote, in parallel
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)  # also the barrier: every rank has finished writing
    if rank == 0:
        _write_manifest(tmp, {file: entry for part in parts for file, entry in part.items()})
        _publish(checkpoint_dir, name, tmp)
        _prune(checkpoint_dir, keep, name)
    barrier()
    return os.path.join(checkpoint_dir, name)


def check_metadata(path: str) -> None:
    """Read DCP's .metadata with the allow-list before DCP does: a corrupt or malicious one is one line, no traceback."""
    try:
        SafeReader(path).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {str(e).strip()[:200]})".split("\n")[0]) from None


def read_train_state(path: str) -> Dict[str, Any]:
    """train_state.pt of a verified checkpoint: step, epoch, data position, scheduler, scaler, world size, config."""
    verify_checkpoint(path)
    check_metadata(path)
    state = torch_load(os.path.join(path, TRAIN_STATE))
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: {TRAIN_STATE} is not a training state (missing fields)")
    return state


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema) -> Optional[Dict[str, Any]]:
    """Load model, optimizer and EMA in place (DCP reshards them to this run's layout); returns this rank's RNG
    state, or None when the checkpoint was written by a different number of processes."""
    verify_checkpoint(path)
    state = sharded_state(model, optimizer, ema)
    _load(state, path, no_dist=not dist.is_initialized())
    _refuse_non_finite(state, path, collective=dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=OPTIONS)
    rng_path = os.path.join(path, RNG_FILE.format(_rank()))
    return torch_load(rng_path) if os.path.isfile(rng_path) else None

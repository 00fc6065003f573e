"""DCP checkpoints: written sharded by 2 ranks, loaded exactly on 1 process and resharded onto 4 (zero3 and DDP);
atomic writes, keep-last-K, and one-line errors for truncated, unfinished or corrupt folders."""
import json
import os
import shutil

import pytest
import torch

from opendit.checkpoint import dcp as ckpt
from opendit.checkpoint.layout import latest_checkpoint, resolve_checkpoint_dir
from opendit.errors import CheckpointError
from opendit.parallel.mesh import build_mesh
from opendit.parallel.parallelize import parallelize
from opendit.training.ema import ShardedEMA
from opendit.training.optim import ShardedAdamW


def setup(dt, plugin=None, world_size=1):
    """Tiny model (parallelized when a plugin is given), AdamW and EMA."""
    model = dt.tiny_model()
    if plugin:
        parallelize(model, mesh=build_mesh(world_size, 1, "cpu"), plugin=plugin)
    opt = ShardedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    return model, opt, ShardedEMA(model)


def snapshot(model, opt, ema, dt):
    """Full copies of every weight, EMA tensor and AdamW moment, keyed by parameter name."""
    names = {id(p): name for name, p in model.named_parameters()}
    moments = {f"{names[id(p)]}.{key}": dt.full(v) for p, state in opt.state.items() for key, v in state.items()}
    return {"model": {n: dt.full(p) for n, p in model.named_parameters()}, "ema": {n: dt.full(t) for n, t in ema.state_dict().items()}, "optim": moments}


def assert_same(a, b):
    for part in ("model", "ema", "optim"):
        assert a[part].keys() == b[part].keys(), part
        for key in a[part]:
            assert torch.equal(a[part][key].reshape(-1), b[part][key].reshape(-1)), f"{part} {key}"


def save_sharded(rank, world_size, dt, folder):
    dt.init()
    model, opt, ema = setup(dt, "zero2", world_size)
    for step in range(2):
        opt.zero_grad()
        dt.loss_on(model, step, rank, world_size).backward()
        opt.step()
        ema.update(0.9)
    ckpt.save_checkpoint(folder, 2, model, opt, ema, {"step": 2}, keep=3)
    reference = snapshot(model, opt, ema, dt)
    if rank == 0:
        torch.save(reference, os.path.join(os.path.dirname(folder), "reference.pt"))


def load_resharded(rank, world_size, dt, folder, reference):
    dt.init()
    for plugin in ("zero3", "ddp"):
        model, opt, ema = setup(dt, plugin, world_size)
        rng = ckpt.load_checkpoint(os.path.join(folder, "step-0000002"), model, opt, ema)
        assert (rng is None) == (rank >= 2)  # the writers' RNG states exist for ranks 0 and 1 only
        assert_same(snapshot(model, opt, ema, dt), reference)


def test_sharded_checkpoint_loads_on_any_world_size(dt, tmp_path):
    folder = str(tmp_path / "checkpoints")
    os.makedirs(folder)
    dt.run(save_sharded, 2, dt, folder)
    assert sorted(os.listdir(folder)) == ["latest", "step-0000002"]
    assert {"__0_0.distcp", "__1_0.distcp", "rng-00000.pt", "rng-00001.pt", "train_state.pt", "manifest.json", ".metadata"} == set(os.listdir(os.path.join(folder, "step-0000002")))
    with open(os.path.join(folder, "step-0000002", "manifest.json")) as f:
        crcs = json.load(f)["crc32"]  # each rank checksummed the files it wrote
    assert sorted(crcs) == [".metadata", "__0_0.distcp", "__1_0.distcp", "rng-00000.pt", "rng-00001.pt", "train_state.pt"]
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    model, opt, ema = setup(dt)  # one process, no process group, plain tensors
    rng = ckpt.load_checkpoint(resolve_checkpoint_dir(str(tmp_path)), model, opt, ema)
    assert rng is not None and "torch" in rng  # rank 0's RNG state
    assert_same(snapshot(model, opt, ema, dt), reference)
    dt.run(load_resharded, 4, dt, folder, reference)
    ema_only = ckpt.read_tensors(os.path.join(folder, "step-0000002"), "ema")  # what sample.py reads
    assert all(torch.equal(ema_only[k], reference["ema"][k]) for k in reference["ema"])


def test_atomic_save_keep_last_and_one_line_errors(dt, tmp_path, monkeypatch):
    model, opt, ema = setup(dt)
    folder = str(tmp_path / "checkpoints")
    os.makedirs(folder)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(folder, step, model, opt, ema, {"step": step}, keep=2)
    assert sorted(os.listdir(folder)) == ["latest", "step-0000002", "step-0000003"]
    assert latest_checkpoint(str(tmp_path)).endswith("step-0000003")

    # A save that dies half-way leaves a .partial folder; the previous checkpoint and `latest` are untouched.
    real_save = ckpt.dcp.save

    def dying_save(state, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        raise KeyboardInterrupt  # killed after the shards, before train_state / manifest

    monkeypatch.setattr(ckpt.dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(folder, 4, model, opt, ema, {"step": 4}, keep=2)
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    assert sorted(os.listdir(folder)) == [".step-0000004.partial", "latest", "step-0000002", "step-0000003"]
    assert ckpt.read_train_state(latest_checkpoint(str(tmp_path)))["step"] == 3

    with pytest.raises(CheckpointError, match="incomplete checkpoint .no manifest.json"):
        ckpt.load_checkpoint(os.path.join(folder, ".step-0000004.partial"), model, opt, ema)
    step3 = os.path.join(folder, "step-0000003")
    shard = os.path.join(step3, "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(CheckpointError, match="truncated checkpoint") as error:
        ckpt.load_checkpoint(step3, model, opt, ema)
    assert "\n" not in str(error.value)
    os.remove(os.path.join(step3, "manifest.json"))
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.read_tensors(step3, "ema")
    ckpt.load_checkpoint(os.path.join(folder, "step-0000002"), model, opt, ema)  # the previous one still loads
    ckpt.save_checkpoint(folder, 5, model, opt, ema, {"step": 5}, keep=2)  # the next save clears the leftovers
    assert sorted(os.listdir(folder)) == ["latest", "step-0000003", "step-0000005"]


def test_metadata_that_would_run_code_is_refused(dt, tmp_path):
    import pickle

    model, opt, ema = setup(dt)
    folder = str(tmp_path / "checkpoints")
    os.makedirs(folder)
    path = ckpt.save_checkpoint(folder, 1, model, opt, ema, {"step": 1})
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(shutil.rmtree, f)  # any callable outside DCP's metadata classes
    ckpt._write_manifest(path, ckpt._own_files(path, 0))
    with pytest.raises(CheckpointError, match="refusing to load shutil.rmtree"):
        ckpt.read_tensors(path, "ema")


def overwrite(path, fraction=0.8, count=4000, byte=b"\xff"):
    """Overwrite `count` bytes at `fraction` of the file (0xff: NaNs where they land in float32 data); same size."""
    size = os.path.getsize(path)
    start = int(size * fraction)
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(byte * min(count, size - start))
    assert os.path.getsize(path) == size


def overwrite_tensor(folder, fqn, count=4000):
    """Overwrite the middle of one tensor's bytes in its .distcp with 0xff (NaNs), as a disk or copy error would."""
    metadata = ckpt.SafeReader(folder).read_metadata()
    (where,) = [info for index, info in metadata.storage_data.items() if index.fqn == fqn]
    with open(os.path.join(folder, where.relative_path), "r+b") as f:
        f.seek(where.offset + where.length // 2 - count // 2)
        f.write(b"\xff" * count)


def one_checkpoint(dt, tmp_path, steps=(1,)):
    model, opt, ema = setup(dt)
    folder = str(tmp_path / "run" / "checkpoints")
    os.makedirs(folder)
    for step in steps:
        opt.zero_grad()
        dt.loss_on(model, step).backward()
        opt.step()
        ema.update(0.9)
        path = ckpt.save_checkpoint(folder, step, model, opt, ema, {"step": step})
    return path, (model, opt, ema)


def test_corrupt_file_of_unchanged_size_is_one_line_error(dt, tmp_path):
    """Every file's CRC-32 is in the manifest; bytes overwritten without changing a size are refused before DCP reads."""
    path, (model, opt, ema) = one_checkpoint(dt, tmp_path)
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    assert set(manifest["crc32"]) == set(manifest["files"]) == set(os.listdir(path)) - {"manifest.json"}
    assert all(manifest["crc32"][n] == ckpt.file_crc32(os.path.join(path, n)) for n in manifest["files"])
    for name, readers in (("__0_0.distcp", ("load", "tensors")), ("train_state.pt", ("load", "state"))):
        copy = str(tmp_path / f"corrupt-{name}")
        shutil.copytree(path, copy)
        overwrite(os.path.join(copy, name))
        for reader in readers:
            with pytest.raises(CheckpointError) as error:
                {"load": lambda: ckpt.load_checkpoint(copy, model, opt, ema), "tensors": lambda: ckpt.read_tensors(copy, "ema"),
                 "state": lambda: ckpt.read_train_state(copy)}[reader]()
            message = str(error.value)
            assert message.startswith(f"{copy}: corrupt checkpoint ({name}: CRC-32 ") and "\n" not in message, message
    ckpt.load_checkpoint(path, model, opt, ema)  # the intact one still loads


def _verify_split(rank, world_size, path, calls_file, dt):
    """One rank of test_ranks_split_the_checksums: its share only, then every rank the same error."""
    dt.init()
    read = []
    crc = ckpt.file_crc32
    ckpt.file_crc32 = lambda file: read.append(os.path.basename(file)) or crc(file)
    try:
        ckpt.verify_checkpoint_on_all_ranks(path)
        ckpt.verify_checkpoint(path)  # verified by the ranks together: no file read again
        with open(f"{calls_file}.{rank}", "w") as f:
            json.dump(read, f)
        corrupt = path + "-corrupt"
        if rank == 0:
            shutil.copytree(path, corrupt)
            overwrite(os.path.join(corrupt, "train_state.pt"))
        torch.distributed.barrier()
        with pytest.raises(CheckpointError) as error:
            ckpt.verify_checkpoint_on_all_ranks(corrupt)
        assert str(error.value).startswith(f"{corrupt}: corrupt checkpoint (train_state.pt: CRC-32 "), str(error.value)
    finally:
        ckpt.file_crc32 = crc


def test_ranks_split_the_checksums(dt, tmp_path):
    """On resume each rank checksums its share of the files (together all of them, each once); a corrupt file in
    any share is the same one-line error on every rank."""
    path, _ = one_checkpoint(dt, tmp_path)
    dt.run(_verify_split, 2, path, str(tmp_path / "read"), dt)
    shares = [json.load(open(tmp_path / f"read.{rank}")) for rank in range(2)]
    names = set(json.load(open(os.path.join(path, "manifest.json")))["crc32"])
    assert sorted(shares[0] + shares[1]) == sorted(names) and shares[0] and shares[1], shares


def write_old_manifest(path):
    """The manifest as written before the CRC-32s: sizes only."""
    with open(os.path.join(path, "manifest.json")) as f:
        sizes = json.load(f)["files"]
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump({"files": sizes}, f)


def test_manifest_without_checksums_still_loads(dt, tmp_path):
    """Checkpoints written before the CRC-32s are checked by size only."""
    path, (model, opt, ema) = one_checkpoint(dt, tmp_path)
    write_old_manifest(path)
    ckpt.load_checkpoint(path, model, opt, ema)
    assert ckpt.read_train_state(path)["step"] == 1 and ckpt.read_tensors(path, "ema")
    os.remove(os.path.join(path, "rng-00000.pt"))
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint \(rng-00000.pt is missing\)"):
        ckpt.load_checkpoint(path, model, opt, ema)


def test_non_finite_values_are_refused_on_load(dt, tmp_path):
    """A checkpoint without CRC-32s (or one corrupted before its checksums were taken) whose bytes put NaNs into the
    AdamW state or the weights is refused when loaded (train.py never saves one), so a run never resumes from it."""
    path, (model, opt, ema) = one_checkpoint(dt, tmp_path)
    write_old_manifest(path)
    overwrite_tensor(path, "optim.state.blocks.0.attn.qkv.weight.exp_avg_sq")  # the audit's case: NaNs in AdamW's state
    with pytest.raises(CheckpointError) as error:
        ckpt.load_checkpoint(path, model, opt, ema)
    assert str(error.value) == f"{path}: corrupt checkpoint (optim.state.blocks.0.attn.qkv.weight.exp_avg_sq holds NaN or infinite values, which are never saved)"
    overwrite_tensor(path, "model.blocks.1.mlp.fc1.weight")  # the weights, as sample.py and the export read them
    with pytest.raises(CheckpointError, match=r"\(model.blocks.1.mlp.fc1.weight holds NaN or infinite values"):
        ckpt.read_tensors(path, "model")


def test_load_auto_skips_a_latest_whose_checksum_fails(dt, tmp_path, capsys):
    """--load auto's fallback (intact_latest) treats a checksum mismatch as damage: the previous checkpoint, warned."""
    from opendit.training.experiment import intact_latest

    path, _ = one_checkpoint(dt, tmp_path, steps=(1, 2))
    overwrite(os.path.join(path, "__0_0.distcp"))
    assert intact_latest(str(tmp_path / "run")) == str(tmp_path / "run" / "checkpoints" / "step-0000001")
    err = capsys.readouterr().err
    assert "corrupt checkpoint (__0_0.distcp" in err and "resuming from the newest intact checkpoint" in err and err.count("\n") == 1


def test_train_py_refuses_a_corrupt_checkpoint_and_load_auto_resumes_the_previous(tmp_path, capsys):
    """The audit's case: 4000 bytes of AdamW state overwritten with 0xff. --load that folder: status 2 and one line
    (not a diverged run naming it as the last good checkpoint); --load auto: the previous checkpoint, with a warning."""
    from ranks import TRAIN_FLAGS  # tests/ranks.py

    from opendit.training import train as train_cli

    def run(*extra):
        try:
            train_cli.main([*TRAIN_FLAGS, "--ckpt_every", "2", *extra])
        except SystemExit as e:
            return e.code
        return 0

    out = tmp_path / "run"
    assert run("--max_steps", "4", "--experiment_dir", str(out)) == 0
    step4 = str(out / "checkpoints" / "step-0000004")
    overwrite_tensor(step4, "optim.state.blocks.0.attn.qkv.weight.exp_avg_sq")
    capsys.readouterr()
    assert run("--max_steps", "6", "--load", step4) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {step4}: corrupt checkpoint (__0_0.distcp: CRC-32 "), err
    assert run("--max_steps", "6", "--load", "auto", "--experiment_dir", str(out)) == 0
    err = capsys.readouterr().err
    assert "corrupt checkpoint (__0_0.distcp" in err and "resuming from the newest intact checkpoint" in err and "last good" not in err
    assert "Resumed from" in open(out / "log.txt").read() and "at step 2" in open(out / "log.txt").read()

"""Checkpoint manifests, verification, resume selection and the background Drive syncer."""

from __future__ import annotations

import shutil
from pathlib import Path

from slmkd.training import checkpoint as C


def _ckpt(folder: Path, step: int, payload: bytes = b"x" * 1000, manifest: bool = True) -> Path:
    d = folder / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(payload + bytes([step % 256]))
    (d / "sub").mkdir()
    (d / "sub" / "optimizer.pt").write_bytes(b"o" * 500)
    if manifest:
        C.write_manifest(d)
    return d


def test_manifest_verification_detects_truncation_corruption_and_incomplete(tmp_path):
    d = _ckpt(tmp_path, 10)
    assert C.verify_checkpoint(d) == (True, "ok")
    f = d / "sub" / "optimizer.pt"
    f.write_bytes(b"o" * 499)
    ok, why = C.verify_checkpoint(d)
    assert not ok and "truncated" in why
    f.write_bytes(b"p" * 500)  # same size, other bytes
    ok, why = C.verify_checkpoint(d)
    assert not ok and "checksum" in why
    assert C.verify_checkpoint(d, checksums=False)[0]
    e = _ckpt(tmp_path, 20, manifest=False)
    ok, why = C.verify_checkpoint(e)
    assert not ok and "incomplete" in why


def test_select_resume_prefers_newest_valid_across_local_and_drive(tmp_path):
    local, drive = tmp_path / "local", tmp_path / "drive"
    _ckpt(drive, 4)
    _ckpt(drive, 8)
    _ckpt(local, 8)
    bad = _ckpt(local, 12)
    (bad / "model.safetensors").write_bytes(b"short")
    msgs: list[str] = []
    got = C.select_resume_checkpoint([local, drive], report=msgs.append)
    assert got == local / "checkpoint-8"  # equal steps: the local copy wins
    assert len(msgs) == 1 and "checkpoint-12" in msgs[0] and "falling back" in msgs[0]
    shutil.rmtree(local)  # local disk gone: Drive
    assert C.select_resume_checkpoint([local, drive], report=msgs.append) == \
        drive / "checkpoint-8"
    (drive / "checkpoint-8" / "sub" / "optimizer.pt").write_bytes(b"")
    assert C.select_resume_checkpoint([local, drive], report=msgs.append) == \
        drive / "checkpoint-4"
    assert C.select_resume_checkpoint([tmp_path / "none"]) is None


def test_syncer_publishes_verified_copies_prunes_and_writes_latest_last(tmp_path):
    local, drive = tmp_path / "local", tmp_path / "drive"
    s = C.DriveSyncer(drive, keep_last=2)
    for step in (1, 2, 3):
        s.submit(_ckpt(local, step))
        assert s.wait(30)
    s.close()
    assert [st for st, _ in C.list_checkpoints(drive)] == [2, 3]
    assert C.read_latest(drive) == "checkpoint-3"
    assert all(C.verify_checkpoint(p)[0] for _, p in C.list_checkpoints(drive))
    assert [st for st, _ in C.list_checkpoints(local)] == [2, 3]
    assert not list(drive.glob(".tmp-*")) and not s.failures


def test_syncer_failure_keeps_local_copy_and_never_raises(tmp_path, monkeypatch):
    local, drive = tmp_path / "local", tmp_path / "drive"
    calls = {"n": 0}
    real = shutil.copytree

    def flaky(src, dst, *a, **kw):
        out = real(src, dst, *a, **kw)
        if not Path(dst).name.startswith(".tmp-"):  # copytree recursing into a sub-folder
            return out
        calls["n"] += 1
        # Drive dies mid-copy: the copied optimizer file is short
        (Path(dst) / "sub" / "optimizer.pt").write_bytes(b"o" * 10)
        return out

    monkeypatch.setattr(C.shutil, "copytree", flaky)
    s = C.DriveSyncer(drive, keep_last=1, retries=2, backoff_s=0.01)
    ck = _ckpt(local, 5)
    s.submit(ck)
    assert s.wait(30)
    s.close()
    assert calls["n"] == 2 and len(s.failures) == 1 and "verification" in s.failures[0]
    assert C.list_checkpoints(drive) == [] and C.read_latest(drive) is None
    assert not list(drive.glob(".tmp-*"))
    assert C.verify_checkpoint(ck)[0]  # the local checkpoint is intact

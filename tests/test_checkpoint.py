"""Checkpoint manifests, verification, resume selection, the background Drive syncer (one
checkpoint on Drive, hashing off the training thread, a full Drive said once, cancellation) and
the removal of stale partial copies."""

from __future__ import annotations

import errno
import shutil
import threading
from pathlib import Path

from slmkd.training import checkpoint as C


def _ckpt(folder: Path, step: int, payload: bytes = b"x" * 1000, manifest: bool = True,
          checksums: bool = False) -> Path:
    """A checkpoint as the trainer leaves it: files, then a manifest of sizes (the SHA-256s are
    the syncer's job)."""
    d = folder / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(payload + bytes([step % 256]))
    (d / "sub").mkdir()
    (d / "sub" / "optimizer.pt").write_bytes(b"o" * 500)
    if manifest:
        C.write_manifest(d, checksums=checksums)
    return d


def test_manifest_verification_detects_truncation_corruption_and_incomplete(tmp_path):
    d = _ckpt(tmp_path, 10, checksums=True)
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


def test_manifest_is_sizes_only_until_checksums_are_added(tmp_path):
    d = _ckpt(tmp_path, 3)
    files = C.read_manifest(d)["files"]
    assert set(files) == {"model.safetensors", "sub/optimizer.pt"}
    assert all(set(m) == {"size"} for m in files.values())
    assert C.verify_checkpoint(d) == (True, "ok")  # sizes are checked
    C.add_checksums(d)
    files = C.read_manifest(d)["files"]
    assert files["sub/optimizer.pt"]["sha256"] == C.sha256_file(d / "sub" / "optimizer.pt")
    (d / "sub" / "optimizer.pt").write_bytes(b"p" * 500)
    assert "checksum" in C.verify_checkpoint(d)[1]
    assert C.manifest_bytes(d) == 1001 + 500


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


def test_syncer_keeps_one_checkpoint_on_drive_and_locally_and_hashes_in_its_thread(
        tmp_path, monkeypatch):
    local, drive = tmp_path / "local", tmp_path / "drive"
    hashed_in: set[str] = set()
    real = C.sha256_file

    def sha(path, cancel=None):
        hashed_in.add(threading.current_thread().name)
        return real(path, cancel)

    monkeypatch.setattr(C, "sha256_file", sha)
    stale = _ckpt(drive, 9)  # left by an earlier session (corrupt: this run resumed below it)
    s = C.DriveSyncer(drive)
    seen = []
    for step in (1, 2, 3):
        s.submit(_ckpt(local, step))
        assert s.wait(30)
        seen.append(([st for st, _ in C.list_checkpoints(drive)],
                     [st for st, _ in C.list_checkpoints(local)]))
    s.close()
    threads = set(hashed_in)
    assert seen == [([1], [1]), ([2], [2]), ([3], [3])] and not stale.exists()
    assert C.read_latest(drive) == "checkpoint-3" and s.drive_checkpoint == drive / "checkpoint-3"
    assert all(C.verify_checkpoint(p)[0] for _, p in C.list_checkpoints(drive))
    assert "sha256" in C.read_manifest(drive / "checkpoint-3")["files"]["sub/optimizer.pt"]
    assert threads == {"slmkd-drive-sync"}  # never on the training (main) thread
    assert not list(drive.glob(".tmp-*")) and not s.failures


def test_submit_removes_older_local_checkpoints_but_not_the_one_being_copied(tmp_path,
                                                                              monkeypatch):
    local, drive = tmp_path / "local", tmp_path / "drive"
    started, release = threading.Event(), threading.Event()
    real = C.copy_tree

    def slow(src, dst, cancel=None):
        started.set()
        assert release.wait(30)
        return real(src, dst, cancel)

    monkeypatch.setattr(C, "copy_tree", slow)
    s = C.DriveSyncer(drive)
    s.submit(_ckpt(local, 1))
    assert started.wait(30)  # checkpoint-1 is being copied
    s.submit(_ckpt(local, 2))
    s.submit(_ckpt(local, 3))  # 2 is superseded before its copy started: removed
    assert [st for st, _ in C.list_checkpoints(local)] == [1, 3]
    release.set()
    assert s.wait(30)
    s.close()
    assert [st for st, _ in C.list_checkpoints(drive)] == [3]
    assert [st for st, _ in C.list_checkpoints(local)] == [3]


def test_syncer_failure_keeps_local_copy_says_it_once_and_never_raises(tmp_path, monkeypatch):
    local, drive = tmp_path / "local", tmp_path / "drive"
    calls = {"n": 0}
    real = C.copy_tree

    def flaky(src, dst, cancel=None):
        real(src, dst, cancel)
        calls["n"] += 1
        # Drive dies mid-copy: the copied optimizer file is short
        (Path(dst) / "sub" / "optimizer.pt").write_bytes(b"o" * 10)

    monkeypatch.setattr(C, "copy_tree", flaky)
    said: list[str] = []
    s = C.DriveSyncer(drive, retries=2, backoff_s=0.01, report=said.append)
    ck = _ckpt(local, 5)
    s.submit(ck)
    assert s.wait(30)
    s.submit(_ckpt(local, 6))
    assert s.wait(30)
    s.close()
    assert calls["n"] == 4 and len(s.failures) == 2 and "verification" in s.failures[0]
    assert len(said) == 1 and "Resumable from Drive: nothing on Drive yet" in said[0]
    assert C.list_checkpoints(drive) == [] and C.read_latest(drive) is None
    assert not list(drive.glob(".tmp-*"))
    assert [st for st, _ in C.list_checkpoints(local)] == [6]  # newest kept locally
    assert C.verify_checkpoint(local / "checkpoint-6")[0]


def test_full_drive_is_not_retried_says_what_is_needed_and_recovers(tmp_path, monkeypatch):
    local, drive = tmp_path / "local", tmp_path / "drive"
    full = {"on": False}
    tries: list[str] = []
    real = C.copy_file

    def copy(src, dst, cancel=None):
        tries.append(str(dst))
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, cancel)

    monkeypatch.setattr(C, "copy_file", copy)
    said: list[str] = []
    s = C.DriveSyncer(drive, retries=3, backoff_s=0.01, report=said.append)
    s.submit(_ckpt(local, 2))
    assert s.wait(30)
    full["on"] = True
    for step in (4, 6):
        tries.clear()
        s.submit(_ckpt(local, step))
        assert s.wait(30)
        assert len(tries) == 1  # ENOSPC: no retry
    assert len(said) == 1 and len(s.failures) == 2
    msg = said[0]
    assert "Drive is full" in msg and "checkpoint-4 needs 1.5 kB" in msg and "free at" in msg
    assert "Resumable from Drive: checkpoint-2 (step 2)" in msg
    assert [st for st, _ in C.list_checkpoints(drive)] == [2]
    assert [st for st, _ in C.list_checkpoints(local)] == [6]
    full["on"] = False
    s.submit(_ckpt(local, 8))
    assert s.wait(30)
    s.close()
    assert len(said) == 2 and "work again" in said[1]
    assert [st for st, _ in C.list_checkpoints(drive)] == [8]
    assert C.is_no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not C.is_no_space(OSError(errno.EIO, "I/O error"))


def test_close_cancel_stops_the_copy_in_progress_and_removes_its_partial_copy(tmp_path,
                                                                              monkeypatch):
    local, drive = tmp_path / "local", tmp_path / "drive"
    in_copy = threading.Event()
    real = C.copy_file

    def copy(src, dst, cancel=None):
        real(src, dst, cancel)
        in_copy.set()
        assert cancel is not None and cancel.wait(30)  # hangs until cancelled
        C._check(cancel)

    monkeypatch.setattr(C, "copy_file", copy)
    s = C.DriveSyncer(drive)
    s.submit(_ckpt(local, 7))
    assert in_copy.wait(30)
    assert list(drive.glob(".tmp-checkpoint-7-*"))  # the partial copy
    s.close(cancel=True)
    assert not s._thread.is_alive()
    assert s.cancelled == [local / "checkpoint-7"] and not s.published and not s.failures
    assert C.list_checkpoints(drive) == [] and not list(drive.glob(".tmp-*"))


def test_remove_stale_copies_and_checkpoint_folder(tmp_path):
    d = tmp_path / "checkpoints"
    _ckpt(d, 4)
    (d / ".tmp-checkpoint-6-11-22").mkdir()
    (d / ".tmp-checkpoint-6-11-22" / "optimizer.pt").write_bytes(b"o" * 700)
    (d / ".old-checkpoint-2-11").mkdir()
    (d / "notes.txt").write_text("mine")
    gone = C.remove_stale_copies(d)
    assert sorted(p.name for p, _ in gone) == [".old-checkpoint-2-11", ".tmp-checkpoint-6-11-22"]
    assert sum(b for _, b in gone) == 700
    assert C.remove_stale_copies(tmp_path, names=["final"]) == []
    (d / "latest").write_text("checkpoint-4\n")
    size = C.dir_bytes(d / "checkpoint-4")
    assert C.remove_checkpoint_folder(d) == size
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]  # not ours: left, folder too
    (d / "notes.txt").unlink()
    assert C.remove_checkpoint_folder(d) == 0 and not d.exists()

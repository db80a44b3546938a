"""zeroflow._atomic: files follow the umask, errors name the target, nothing half-written is left."""
import os
import stat

import pytest

from zeroflow._atomic import atomic_write, atomic_write_bytes


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_file_mode_follows_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(str(tmp_path / "f.json"), b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.json").st_mode) == mode


def test_errors_name_the_target_and_leave_nothing(tmp_path):
    target = str(tmp_path / "missing" / "f.json")
    with pytest.raises(FileNotFoundError) as e:
        atomic_write_bytes(target, b"x")
    assert e.value.filename == target and ".tmp-" not in str(e.value)

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    (tmp_path / "f.json").write_bytes(b"old")
    with pytest.raises(OSError) as e:
        atomic_write(str(tmp_path / "f.json"), fail)
    assert e.value.filename == str(tmp_path / "f.json")
    assert (tmp_path / "f.json").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.json"]           # the temporary file is gone


def test_the_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    """Renamed before its data reached the disk, a crash could leave the target empty or
    half-written under its final name: the very thing the temporary file is there to prevent."""
    import zeroflow._atomic as atomic
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append("fsync")
        real_fsync(fd)

    def replace(src, dst):
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic_write_bytes(str(tmp_path / "f.json"), b"{}")
    assert calls == ["fsync", "replace"]
    assert (tmp_path / "f.json").read_bytes() == b"{}"

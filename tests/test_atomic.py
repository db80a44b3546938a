"""zeroflow._atomic: files follow the umask, errors name the target, nothing half-written is left."""
import contextlib
import os
import stat

import pytest

from zeroflow._atomic import atomic_write, atomic_write_bytes


def record_syncs_and_renames(monkeypatch) -> list:
    """The atomic write's fsyncs ("fsync file", or ("fsync dir", the folder's inode)) and
    renames ("replace"), in order, as they happen (each still runs)."""
    import zeroflow._atomic as atomic
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        calls.append(("fsync dir", st.st_ino) if stat.S_ISDIR(st.st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    return calls


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
    calls = record_syncs_and_renames(monkeypatch)
    atomic_write_bytes(str(tmp_path / "f.json"), b"{}")
    assert calls[:2] == ["fsync file", "replace"]
    assert (tmp_path / "f.json").read_bytes() == b"{}"


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="no directory fsync without os.O_DIRECTORY")
def test_the_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    """The file's data synced is not enough: the rename is an entry in the directory, and until
    the directory is synced a power loss can bring back the old file (or none)."""
    calls = record_syncs_and_renames(monkeypatch)
    (tmp_path / "sub").mkdir()
    atomic_write_bytes(str(tmp_path / "sub" / "f.json"), b"{}")
    assert calls == ["fsync file", "replace", ("fsync dir", os.stat(tmp_path / "sub").st_ino)]


def test_a_failed_directory_sync_is_raised_but_no_sync_support_is_not(tmp_path, monkeypatch):
    """EIO from the directory's fsync means the rename may not be on the disk: the caller must
    hear it. EINVAL is a filesystem with no directory sync at all (some FUSE / network ones)."""
    import errno

    import zeroflow._atomic as atomic
    if not hasattr(os, "O_DIRECTORY"):
        pytest.skip("no directory fsync without os.O_DIRECTORY")
    real_fsync = os.fsync

    def failing(code):
        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(code, os.strerror(code))
            real_fsync(fd)
        return fsync

    target = str(tmp_path / "f.json")
    monkeypatch.setattr(atomic.os, "fsync", failing(errno.EINVAL))
    atomic_write_bytes(target, b"a")
    assert (tmp_path / "f.json").read_bytes() == b"a"
    monkeypatch.setattr(atomic.os, "fsync", failing(errno.EIO))
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, b"b")
    assert e.value.errno == errno.EIO and e.value.filename == target
    assert os.listdir(tmp_path) == ["f.json"]


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="no directory fsync without os.O_DIRECTORY")
def test_a_folder_that_may_be_written_but_not_read_takes_the_write(tmp_path, monkeypatch):
    """A folder of mode -wx (a drop-box) cannot be opened to sync it: the file was written and
    renamed into it, and the write raised PermissionError naming the file as if it had failed.
    (Simulated: root reads any folder.)"""
    import zeroflow._atomic as atomic
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if flags & os.O_DIRECTORY:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", refusing)
    atomic_write_bytes(str(tmp_path / "f.json"), b"{}")
    assert os.listdir(tmp_path) == ["f.json"] and (tmp_path / "f.json").read_bytes() == b"{}"


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="no directory fsync without os.O_DIRECTORY")
def test_a_relative_path_in_the_current_folder_syncs_that_folder(tmp_path, monkeypatch):
    """"f.json" has no folder part (os.path.dirname gives ""): the current folder is the one synced."""
    import zeroflow._atomic as atomic
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append(st.st_ino)
        real_fsync(fd)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic_write_bytes("f.json", b"{}")
    assert synced == [os.stat(tmp_path).st_ino] and (tmp_path / "f.json").read_bytes() == b"{}"


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="no directory fsync without os.O_DIRECTORY")
@pytest.mark.parametrize("code", ["EINVAL", "ENOTSUP", "EOPNOTSUPP"])
def test_a_filesystem_without_directory_sync_takes_the_write(tmp_path, monkeypatch, code):
    import errno

    import zeroflow._atomic as atomic
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic_write_bytes(str(tmp_path / "f.json"), b"a")
    assert (tmp_path / "f.json").read_bytes() == b"a"


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="no directory fsync without os.O_DIRECTORY")
@pytest.mark.parametrize("fails", [False, True])
def test_the_folder_opened_for_its_sync_is_closed(tmp_path, monkeypatch, fails):
    """One descriptor per write (a checkpoint per task, a JSON per benchmark case) left open ran
    a long job out of descriptors; closed after a failed sync too."""
    import errno

    import zeroflow._atomic as atomic
    real_open, real_fsync, opened = os.open, os.fsync, []

    def spy_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECTORY:
            opened.append(fd)
        return fd

    def fsync(fd):
        if fails and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "open", spy_open)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(OSError) if fails else contextlib.nullcontext():
        atomic_write_bytes(str(tmp_path / "f.json"), b"a")
    assert len(opened) == 1
    with pytest.raises(OSError):
        os.fstat(opened[0])

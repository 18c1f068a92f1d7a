"""files.py: atomic replacement, log lines that are never torn, output paths checked up front."""
import errno
import json
import os
import sys
from pathlib import Path

import pytest

import files
import compare
from test_reliability import assert_one_line_error


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_replacement_keeps_the_old_file_and_no_temporary(tmp_path):
    path = files.write_text_atomic(tmp_path / "sub" / "out.jsonl", "old\n")
    assert path.read_text() == "old\n"

    def writes_half(tmp: Path):
        tmp.write_text("ne")
        full_disk()
    with pytest.raises(files.WriteFailed) as info:
        files.replace_atomic(path, writes_half)
    assert str(info.value) == (f"cannot write {path} (No space left on device); the file is unchanged: free "
                               f"some space, then rerun")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_text() == "old\n" and os.listdir(path.parent) == ["out.jsonl"]
    files.write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and os.listdir(path.parent) == ["out.jsonl"]


def test_a_failed_append_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    files.append_line(log, json.dumps({"step": 1}))
    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(files.WriteFailed, match=f"^cannot write {log} \\(No space left on device\\); the "
                                                f"file is unchanged: free some space, then rerun$"):
        files.append_line(log, json.dumps({"step": 2, "text": "x" * 10_000}))
    assert log.read_text() == '{"step": 1}\n'


def safetensors_full_disk(*args, **kwargs):
    """What safetensors raises when the disk fills up under save_file (seen on a full tmpfs)."""
    from safetensors import SafetensorError
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def no_permission(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


FULL = "No space left on device); the file is unchanged: free some space, then rerun"


@pytest.mark.parametrize("write, patches, message", [
    (lambda path: files.write_text_atomic(path, "new\n"), {(Path, "write_text"): full_disk}, FULL),
    (lambda path: files.write_text_atomic(path, "new\n"), {(files.os, "fsync"): full_disk}, FULL),
    (lambda path: files.write_text_atomic(path, "new\n"), {(files.os, "replace"): full_disk}, FULL),
    (lambda path: files.replace_atomic(path, safetensors_full_disk), {}, FULL),
    (lambda path: files.append_line(path, "new"), {(files.os, "fsync"): full_disk}, FULL),
    (lambda path: files.write_text_atomic(path, "new\n"), {(Path, "write_text"): no_permission},
     "Permission denied); the file is unchanged: make its directory writable, then rerun"),
], ids=["write", "flush", "rename", "safetensors", "append", "permission"])
def test_every_write_names_its_target_and_leaves_it_unchanged(tmp_path, monkeypatch, write, patches, message):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    for (owner, name), error in patches.items():
        monkeypatch.setattr(owner, name, error)
    with pytest.raises(files.WriteFailed) as info:
        write(path)
    monkeypatch.undo()
    assert str(info.value) == f"cannot write {path} ({message}"
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["out.txt"]


def test_an_error_that_is_not_the_file_systems_is_not_taken_for_one(tmp_path):
    def bug(tmp):
        raise KeyError("a bug in the writer")
    with pytest.raises(KeyError):
        files.replace_atomic(tmp_path / "out.txt", bug)
    assert os.listdir(tmp_path) == []
    assert files.os_error(ValueError("no errno here")) is None


def test_check_writable_names_the_flag_and_the_fix(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    assert files.check_writable(tmp_path / "new" / "deeper" / "p.jsonl", "--out") == tmp_path / "new" / "deeper" / "p.jsonl"
    assert files.check_writable(tmp_path / "a_dir", "--out", is_dir=True) == tmp_path / "a_dir"
    cases = [((tmp_path / "a_dir", False), "is a directory; --out takes a file path: pass another --out"),
             ((tmp_path / "a_file", True), "is a file; --out takes a directory path"),
             ((tmp_path / "a_file" / "p.jsonl", False), f"{tmp_path / 'a_file'} is a file, not a directory")]
    for (path, is_dir), message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            files.check_writable(path, "--out", is_dir)
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc, a place not even root can write")
def test_check_writable_refuses_an_unwritable_place():
    with pytest.raises(ValueError, match=r"--out /proc/muscle/report: cannot create a file in /proc \(.+\); "
                                         r"pass a directory in a directory you can write to"):
        files.check_writable("/proc/muscle/report", "--out", is_dir=True)


def write_records(path: Path, n: int = 2) -> str:
    rows = [{"id": f"q{i}", "task": "piqa", "prediction": 0, "correct": bool(i % 2), "score": float(i % 2)}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_compare_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys):
    old, new = write_records(tmp_path / "old.jsonl"), write_records(tmp_path / "new.jsonl")
    (tmp_path / "report").write_text("not a directory")
    for out, fragment in [(tmp_path / "report", "is a file; --out takes a directory path"),
                          (Path("/proc/muscle"), "cannot create a file in /proc")]:
        assert compare.main([old, new, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err
    assert (tmp_path / "report").read_text() == "not a directory"


def test_a_report_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    old, new = write_records(tmp_path / "old.jsonl", 4), write_records(tmp_path / "new.jsonl", 4)
    out = tmp_path / "out"
    assert compare.main([old, new, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(files, "fsync_file", full_disk)
    assert compare.main([old, new, "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write the report to --out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

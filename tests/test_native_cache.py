"""The native kernel's build cache (hf_to.native) cannot hurt a run.

A library is loaded only when the sidecar written after its build matches its size and
sha256; a bad cache entry is rebuilt, an unwritable cache falls back to a private directory,
built files are readable by others, and temporary files of failed or killed builds go away.
Loads that could crash (``dlopen`` of a truncated file raises SIGBUS) run in subprocesses.
A stand-in compiler copies the library this process built, so no test waits for a real build.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hf_to import native

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: hf_to.native cannot be built")


@pytest.fixture
def fake_cc(tmp_path: Path) -> str:
    """A 'compiler' that writes the library this process loaded to its ``-o`` path (``FAKE_CC_SLEEP``
    seconds after creating it empty; ``FAKE_CC_FAIL=1``: writes half of it and fails)."""
    script = tmp_path / "fakecc"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import os, shutil, sys, time
            if "--version" in sys.argv:
                print("fakecc 1.0")
                sys.exit(0)
            out = sys.argv[sys.argv.index("-o") + 1]
            open(out, "wb").close()
            time.sleep(float(os.environ.get("FAKE_CC_SLEEP", "0")))
            data = open({str(native.library_path())!r}, "rb").read()
            if os.environ.get("FAKE_CC_FAIL"):
                open(out, "wb").write(data[: len(data) // 2])
                sys.exit("fakecc: failed")
            open(out, "wb").write(data)
            """
        )
    )
    script.chmod(0o755)
    return str(script)


def _env(cache: Path, cc: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_TO_NATIVE"}
    return {**env, "HF_TO_CACHE": str(cache), "CC": cc, **extra}


_PROBE = "from hf_to import native; print(native.available()); print(native.library_path())"


def _probe(cache: Path, cc: str, **extra: str) -> tuple[bool, Path | None, str]:
    """Load the kernel in a fresh process: (available, library path, stderr)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, env=_env(cache, cc, **extra), capture_output=True, text=True
    )
    assert done.returncode == 0, f"the process died (rc {done.returncode}):\n{done.stderr[-3000:]}"
    ok, path = done.stdout.split()
    return ok == "True", None if path == "None" else Path(path), done.stderr


def _library(cache: Path) -> Path:
    (path,) = (cache / "native").glob("hf_to_native_*.so")
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no_sidecar"])
def test_a_damaged_library_in_the_cache_is_rebuilt_not_loaded(damage, tmp_path, fake_cc):
    cache = tmp_path / "cache"
    ok, path, _ = _probe(cache, fake_cc)
    assert ok and path == _library(cache)
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(good)))  # the recorded size, other bytes
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        Path(str(path) + ".sha256").unlink()
    ok, again, _ = _probe(cache, fake_cc)
    assert ok and again == path
    assert path.read_bytes() == good


def test_built_files_are_readable_by_others_under_umask_022(tmp_path, fake_cc):
    cache = tmp_path / "cache"
    before = os.umask(0o022)
    try:
        ok, path, _ = _probe(cache, fake_cc)
    finally:
        os.umask(before)
    assert ok
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE(Path(str(path) + ".sha256").stat().st_mode) == 0o644


def test_an_unwritable_cache_falls_back_to_a_private_directory_with_one_warning(tmp_path, fake_cc):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a cache under a regular file cannot be created, even by root
    ok, path, err = _probe(blocker / "cache", fake_cc)
    assert ok and path is not None and not path.is_relative_to(blocker)
    assert err.count("cannot write the native kernel's cache") == 1
    assert not path.exists()  # the private directory went with the process


def test_a_failed_build_leaves_no_temporary_files(tmp_path, fake_cc):
    cache = tmp_path / "cache"
    ok, path, err = _probe(cache, fake_cc, FAKE_CC_FAIL="1")
    assert not ok and path is None and "native CPU kernel is unavailable" in err
    assert list((cache / "native").iterdir()) == []


def test_a_killed_build_leaves_nothing_that_is_loaded_and_its_leftovers_are_removed(tmp_path, fake_cc):
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROBE], cwd=ROOT, env=_env(cache, fake_cc, FAKE_CC_SLEEP="60"), start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not list((cache / "native").glob("hf_to_build_*.so")):
            assert time.monotonic() < deadline and proc.poll() is None, "the build did not start"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its compiler, as a killed job
        proc.wait()
    (leftover,) = (cache / "native").glob("hf_to_build_*.so")
    young = cache / "native" / "hf_to_build_concurrent.so"  # a build running beside the next one
    young.write_bytes(b"")
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    ok, path, _ = _probe(cache, fake_cc)
    assert ok and path.name.startswith("hf_to_native_")
    assert not leftover.exists() and young.exists()

"""A CPU run keeps its freed activation memory: the next step does not fault it in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lmtrain import host_memory

SRC = Path(__file__).resolve().parent.parent / "src"
glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the thresholds are glibc's")

#: A training-like pattern straight through glibc's malloc (no other allocation in between, so
#: the heap's layout is the same at every run): 40 blocks of 6 MB allocated and written, as a
#: step's activations are, then all freed; one step to warm up, three counted.
STEPS = """
import ctypes, resource, sys
from lmtrain.host_memory import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 6 * 1024 * 1024
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
def step():
    blocks = [libc.malloc(SIZE) for _ in range(40)]
    for block in blocks:
        ctypes.memset(block, 1, SIZE)
    for block in blocks:
        libc.free(block)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    env["PYTHONPATH"] = str(SRC)
    out = subprocess.run([sys.executable, "-c", STEPS, mode], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.integration
@glibc
def test_freed_step_memory_is_reused_not_faulted_in_again() -> None:
    default_applied, default_faults = _faults("default")
    tuned_applied, tuned_faults = _faults("tuned")
    assert not default_applied and tuned_applied
    # 3 steps x 240 MB is 184,320 pages: by default glibc maps each block afresh and unmaps it
    # when freed, so every step faults all its pages in again; tuned, the freed heap is reused
    assert default_faults > 150_000
    assert tuned_faults < 5_000


@pytest.mark.unit
@pytest.mark.parametrize("env", [
    {"MALLOC_TRIM_THRESHOLD_": "0"}, {"MALLOC_ARENA_MAX": "2"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
    {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
    {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
])
def test_an_allocator_the_user_chose_is_left_alone(env: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert host_memory.user_tuned(env)
    monkeypatch.setattr(host_memory, "_applied", None)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert host_memory.keep_freed_memory() is False


@pytest.mark.unit
def test_a_plain_environment_is_not_user_tuned() -> None:
    assert not host_memory.user_tuned({"HOME": "/tmp", "LD_PRELOAD": "libfoo.so"})


@pytest.mark.unit
def test_a_sharded_run_asks_torch_for_huge_pages_before_torch_loads(tmp_path, monkeypatch):
    mode = tmp_path / "enabled"
    monkeypatch.setattr(host_memory, "THP_MODE_FILE", mode)
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as `lmtrain train` starts
    mode.write_text("always [madvise] never\n")
    env: dict[str, str] = {}
    assert host_memory.huge_pages_for_sharded_run("fsdp", env)
    assert env == {host_memory.THP_VARIABLE: "1"}
    assert not host_memory.huge_pages_for_sharded_run("ddp", ddp := {})
    assert ddp == {}  # a whole-model run keeps its memory: huge pages slowed it down
    mine = {host_memory.THP_VARIABLE: "0"}
    assert not host_memory.huge_pages_for_sharded_run("fsdp", mine)
    assert mine == {host_memory.THP_VARIABLE: "0"}  # the user's choice stands
    mode.write_text("always madvise [never]\n")
    assert not host_memory.huge_pages_for_sharded_run("fsdp", off := {})
    assert off == {}
    mode.unlink()  # no such kernel switch (not Linux)
    assert not host_memory.huge_pages_for_sharded_run("fsdp", {})


@pytest.mark.unit
def test_huge_pages_are_not_asked_once_torch_is_loaded(tmp_path, monkeypatch):
    mode = tmp_path / "enabled"
    mode.write_text("[always] madvise never\n")
    monkeypatch.setattr(host_memory, "THP_MODE_FILE", mode)
    import torch  # noqa: F401  (torch reads the variable at its first allocation)

    env: dict[str, str] = {}
    assert not host_memory.huge_pages_for_sharded_run("fsdp", env)
    assert env == {}

"""What a benchmark ran on, in a few lines: the torch build, threads, the allocator, the CPU's
bf16 support and which of lmtrain's extras are installed. A benchmark prints it beside its
table, so a surprising number explains itself (issue 28).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import re

import torch

from lmtrain import host_memory
from lmtrain.device import cpu_supports_bf16

#: Variables that choose threads, the allocator or the CPU kernels torch uses
TUNING_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY", "KMP_BLOCKTIME",
                    "OMP_PROC_BIND", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                    "DNNL_MAX_CPU_ISA", "LD_PRELOAD", *host_memory.USER_TUNED_VARIABLES)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            found = re.search(r"^model name\s*:\s*(.+)$", fh.read(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1).strip() if found else (platform.processor() or "unknown CPU")


def installed_extras(package: str = "lmtrain") -> dict[str, bool]:
    """Each optional extra of ``package`` -> whether every distribution it requires is
    installed (read from the package's own metadata, so new extras need no change here)."""
    try:
        meta = metadata.metadata(package)
    except metadata.PackageNotFoundError:
        return {}
    extras: dict[str, bool] = {name: True for name in meta.get_all("Provides-Extra") or []}
    for requirement in meta.get_all("Requires-Dist") or []:
        marker = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if marker is None or marker.group(1) not in extras:
            continue
        name = re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            extras[marker.group(1)] = False
    return extras


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def describe() -> list[str]:
    """The environment as ``key: value`` lines (see the module doc)."""
    tuned = {name: os.environ[name] for name in TUNING_VARIABLES if name in os.environ}
    glibc = platform.libc_ver()
    applied = host_memory.thresholds_set()
    allocator = (f"{glibc[0] or 'non-glibc'} {glibc[1]}".strip() + "; lmtrain's thresholds "
                 + {True: "set", False: "not set (user-tuned or refused)",
                    None: "not applied yet"}[applied])
    extras = installed_extras()
    lines = [
        f"python {platform.python_version()}; torch {torch.__version__} "
        f"(git {torch.version.git_version[:10]}, CUDA {torch.version.cuda or 'none'}); "
        f"transformers {_version('transformers')}; peft {_version('peft')}; "
        f"numpy {_version('numpy')}",
        f"cpu: {cpu_name()}, {os.cpu_count()} logical cores; torch kernels "
        f"{torch.backends.cpu.get_cpu_capability()}; native bf16 (avx512_bf16/amx) "
        f"{'yes' if cpu_supports_bf16() else 'no'}; oneDNN "
        f"{'yes' if torch.backends.mkldnn.is_available() else 'no'} "
        f"(bf16 {'yes' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'no'}); "
        f"MKL {'yes' if torch.backends.mkl.is_available() else 'no'}",
        f"threads: torch {torch.get_num_threads()}, interop {torch.get_num_interop_threads()}; "
        f"parallel backend {_parallel_backend()}",
        f"allocator: {allocator}",
        "tuning variables: " + (", ".join(f"{k}={v}" for k, v in tuned.items()) or "none"),
        "lmtrain extras: " + (", ".join(f"{k} {'yes' if v else 'no'}"
                                        for k, v in extras.items()) or "lmtrain not installed"),
    ]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name()}; bf16 "
                     f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    return lines


def _parallel_backend() -> str:
    found = re.search(r"ATen parallel backend: (.+)", torch.__config__.parallel_info())
    return found.group(1).strip() if found else "unknown"


def print_environment() -> None:
    """:func:`describe`'s lines under a heading, as a markdown list."""
    print("Environment:")
    for line in describe():
        print(f"- {line}")
    print()

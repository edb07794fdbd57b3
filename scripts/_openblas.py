"""Run a benchmark with OpenBLAS preloaded, so CPU figures measure our graph, not a slow BLAS.

MLX's Linux CPU wheel links the reference BLAS (about 5 GFLOP/s for an fp32 matmul on these
machines, against about 60 with OpenBLAS on 2 cores). Every benchmark script calls
``preload_openblas()`` before importing MLX: it finds an OpenBLAS (the system's, else the one in
the ``cmeel-openblas`` wheel, which the ``bench`` extra installs) and re-executes the script
once with it in ``LD_PRELOAD`` (after checking, in a subprocess, that it runs on this CPU: the
wheel is built for one core type, e.g. SKYLAKEX, and dies on CPUs without AVX-512; Debian's
``libopenblas0-pthread`` picks its kernels at run time). The wheel's OpenBLAS needs
``libgfortran.so.5``, which MLX's wheel bundles under a mangled name in ``mlx_cpu.libs/``: a
symlink with the plain name in a temporary folder on ``LD_LIBRARY_PATH`` makes it load.
``QWEN_MLX_BLAS=reference`` opts out. Nothing happens on macOS (MLX uses Accelerate there).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SYSTEM_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
MARK = "QWEN_MLX_BLAS_PRELOADED"


def candidates() -> list[Path]:
    """OpenBLAS builds to try, best first: the system's (Debian: libopenblas0-pthread, built
    for every x86 core), then the cmeel-openblas wheel's (built for one core type)."""
    found = [Path(p) for p in SYSTEM_PATHS if Path(p).is_file()]
    wheel = Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
    return [*found, wheel] if wheel.is_file() else found


def preload_env(lib: Path) -> dict[str, str]:
    """The environment that preloads ``lib``."""
    env = dict(os.environ, LD_PRELOAD=f"{lib}:{os.environ.get('LD_PRELOAD', '')}".rstrip(":"))
    env[MARK] = str(lib)
    if "cmeel.prefix" in str(lib):  # the wheel's build needs a libgfortran.so.5 it can find
        site = Path(sysconfig.get_paths()["purelib"])
        mangled = sorted(glob.glob(str(site / "mlx_cpu.libs" / "libgfortran*.so.5*")))
        if mangled:
            links = Path(tempfile.mkdtemp(prefix="qwen-mlx-blas-"))
            (links / "libgfortran.so.5").symlink_to(Path(mangled[0]).resolve())
            paths = [str(links), str(site / "mlx_cpu.libs"), os.environ.get("LD_LIBRARY_PATH", "")]
            env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
    return env


def works(env: dict[str, str]) -> bool:
    """Whether MLX runs a matmul with this BLAS (a wheel built for AVX-512 dies on other CPUs)."""
    probe = "import mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))"
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120)
    return run.returncode == 0


def blas_in_use() -> str:
    """What the benchmark runs on, for its header line."""
    if sys.platform != "linux":
        return "platform BLAS"
    if os.environ.get(MARK):
        return f"OpenBLAS ({os.environ[MARK]})"
    return "MLX's bundled reference BLAS (slow: install the bench extra for OpenBLAS)"


def preload_openblas() -> None:
    """Re-execute this script once with OpenBLAS preloaded (Linux only; a no-op otherwise)."""
    if sys.platform != "linux" or os.environ.get(MARK) or os.environ.get("QWEN_MLX_BLAS"):
        return
    for lib in candidates():
        env = preload_env(lib)
        if works(env):
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
        print(f"note: {lib} does not run on this CPU; trying the next BLAS", file=sys.stderr)

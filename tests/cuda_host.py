"""The host build of the CUDA sources: every ``csrc/cuda/*.cu`` compiled with the host
compiler and ``-DPCONV_CUDA_HOST``, so that the CUDA op code, launchers and kernels run on
CPU tensors (``csrc/cuda/runtime.cuh`` says how). Its ops are
``torch.ops.pconv_cuda_host.*``, with the schemas of ``torch.ops.pconv.*``; the module
returned by :func:`load` holds the runtime's test controls.

The build is a test tool, not part of the package: ``load()`` compiles it with
``torch.utils.cpp_extension.load`` into ``build/cuda_host`` (ninja rebuilds only what
changed), about 30 s on two cores the first time.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
BUILD = ROOT / "build"


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def sources() -> list[Path]:
    """The translation units: one host .cpp per CUDA source (each includes its .cu, so
    that the host compiler takes it), the host runtime and module, and the checks the op
    code shares with the other backends."""
    wrappers = BUILD / "cuda_host_sources"
    wrappers.mkdir(parents=True, exist_ok=True)
    units = []
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        unit = wrappers / f"{cu.stem}_cu.cpp"
        _write_if_changed(unit, f'#include "{cu}"\n')
        units.append(unit)
    return units + [CSRC / "cuda" / "host" / "runtime.cpp", CSRC / "cuda" / "host" / "module.cpp",
                    CSRC / "pconv_shared.cpp"]


def load(verbose: bool = False, address_sanitizer: bool = False):
    """Builds (where needed) and loads the host build; returns its Python module.

    With ``address_sanitizer`` the build is instrumented by AddressSanitizer (its own
    folder, ``build/cuda_host_asan``): every kernel access outside a tensor's allocation
    aborts the process with a report. The ASan runtime must then be loaded first
    (``LD_PRELOAD``, see :func:`asan_preload`), so such a build runs in a process of its
    own.
    """
    from torch.utils import cpp_extension

    name, flags, ldflags = "pconv_cuda_host", [], []
    if address_sanitizer:
        name += "_asan"
        flags = ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags = ["-fsanitize=address"]
    build = BUILD / name.removeprefix("pconv_")
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources()],
        extra_cflags=["-DPCONV_CUDA_HOST", "-O1", "-std=c++17"] + flags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(CSRC)],
        build_directory=str(build),
        verbose=verbose,
    )


def asan_preload() -> str | None:
    """What LD_PRELOAD must hold for an AddressSanitizer build to load: the host compiler's
    ASan runtime, and its libstdc++ (ASan's interceptor of C++ throws must find it at
    start, or the first exception a kernel's argument check throws trips it). None where the
    compiler has no ASan runtime."""
    import subprocess

    cxx = os.environ.get("CXX", "c++")
    paths = []
    for lib in ("libasan.so", "libstdc++.so.6"):
        try:
            path = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True,
                                  text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
        if not (os.path.isabs(path) and os.path.exists(path)):
            return None
        paths.append(path)
    return " ".join(paths)


if __name__ == "__main__":
    module = load(verbose=True)
    print("built", module.__file__)

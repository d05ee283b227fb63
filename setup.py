"""Build of the pconv_cuda._C extension.

CPU kernels are always built. CUDA kernels are added when the installed torch has CUDA and
a toolkit is found, or when FORCE_CUDA=1 (then TORCH_CUDA_ARCH_LIST picks the targets, as
in torch.utils.cpp_extension). Build with `pip install --no-build-isolation .` so that the
extension is compiled against the torch already installed.

The library uses only CPython's stable ABI (the ops are reached through the dispatcher,
torch.ops.pconv; the module itself has two plain C functions), so one build, named
`_C.abi3.so`, loads in every Python from 3.10 on that has the same torch.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The oldest CPython the stable-ABI build must load in (requires-python in pyproject.toml).
MIN_PYTHON = "cp310"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda(torch_has_cuda, cuda_home, force=None):
    """True when the CUDA kernels should be compiled.

    FORCE_CUDA=1 builds them whatever torch reports (a GPU-less build machine); FORCE_CUDA=0
    or unset builds them only where torch was built with CUDA and a toolkit is installed.
    """
    if force is None:
        force = os.environ.get("FORCE_CUDA", "0")
    if force == "1":
        return True
    return bool(torch_has_cuda) and cuda_home is not None


def make_extension():
    import torch
    from torch.utils import cpp_extension

    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    link_flags = ["-fopenmp"]
    if want_cuda(torch.version.cuda is not None, cpp_extension.CUDA_HOME):
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to "
                               "the toolkit root (the folder holding bin/nvcc)")
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # With no GPU to query, cpp_extension cannot pick targets: build Ampere + Hopper.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
            print("pconv: TORCH_CUDA_ARCH_LIST not set and no GPU visible; building for 8.0;9.0+PTX")
        nvcc_flags = ["-O3", "--use_fast_math", "-std=c++17", "--expt-relaxed-constexpr"]
        return cpp_extension.CUDAExtension(
            "pconv_cuda._C",
            cpu_sources + _sources("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    return cpp_extension.CppExtension(
        "pconv_cuda._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags, py_limited_api=True,
    )


if __name__ == "__main__":
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=[make_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": MIN_PYTHON}},
    )

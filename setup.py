"""Package layout and the optional C++/CUDA extension ``gkd.kd._C``; the metadata lives in setup.cfg.

Layout: the repository keeps its parts as top-level folders (``core/``, ``kd/``, ``export/``, ``bench/``) beside the
CLI package ``gkd/``, and installs all of them under the one import name ``gkd``: ``gkd.core``, ``gkd.kd``,
``gkd.export``, ``gkd.bench`` (``package_dir`` maps each folder). Generic top-level names such as ``export`` would collide with other
projects' modules (YOLOv5 has an ``export.py`` at its root). Packages are discovered, not listed.

Build matrix (each case keeps the package installable):

* nvcc found (``CUDA_HOME`` or ``/usr/local/cuda``) and torch built with CUDA -> CUDAExtension (CPU + CUDA kernels).
  No GPU is needed to compile: set ``TORCH_CUDA_ARCH_LIST`` (default here "8.0;9.0").
* no nvcc, or ``GKD_CPU_ONLY=1``                                              -> CppExtension (CPU kernel only).
* ``GKD_NO_EXT=1`` or no sources                                             -> no extension; ``kd`` falls back to
  its pure-PyTorch implementation at run time (with a one-line warning).

Workarounds for building CUDA code on a machine without a GPU (see README, "Installation"):
``CUDA_HOME`` is pinned to the real toolkit (``/usr/local/bin/nvcc`` may be a wrapper), and the CUDA math-library
headers that ATen includes are taken from the ``nvidia`` pip packages that ship with torch.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("kd", "csrc")
#: repository folder -> import name
PARTS = {"core": "gkd.core", "kd": "gkd.kd", "export": "gkd.export", "bench": "gkd.bench"}


def _packages() -> tuple[list[str], dict[str, str]]:
    """Every package under ``gkd/`` and the three part folders, named as installed (``kd.data`` -> ``gkd.kd.data``)."""
    packages = find_packages(ROOT, include=["gkd", "gkd.*"])
    for folder, name in PARTS.items():
        packages += [name + sub[len(folder):] for sub in find_packages(ROOT, include=[folder, folder + ".*"])]
    return packages, {"gkd": "gkd", **{name: folder for folder, name in PARTS.items()}}


def _import_torch_or_exit():
    """torch is needed to compile the extension against the torch it will run with; say how when it is missing."""
    try:
        import torch
    except ImportError:
        sys.exit("gkd: building the C++/CUDA extension needs the torch you will run it with, and this build "
                 "environment has none (pip's build isolation). Install torch first, then build without isolation: "
                 "pip install torch==2.14.1 torchvision==0.29.1 && pip install --no-build-isolation .  "
                 "(or GKD_NO_EXT=1 pip install . for no extension: a slower pure-PyTorch operator)")
    return torch


def _find_cuda_home():
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [env] if env else []
    candidates.append("/usr/local/cuda")
    for cand in candidates:
        if cand and os.path.isfile(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def _nvidia_include_dirs(torch):
    """Header folders of the ``nvidia`` pip packages (cusparse.h, cublas_v2.h ... live only there)."""
    dirs = []
    try:
        import nvidia  # noqa: F401  (namespace package installed with CUDA builds of torch)
    except ImportError:
        return dirs
    major = (torch.version.cuda or "").split(".")[0]
    for base in list(nvidia.__path__):
        for sub in (f"cu{major}", ""):
            inc = os.path.join(base, sub, "include") if sub else None
            if inc and os.path.isdir(inc):
                dirs.append(inc)
        # older layouts: nvidia/<lib>/include
        dirs.extend(sorted(glob.glob(os.path.join(base, "*", "include"))))
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


def _extensions():
    if os.environ.get("GKD_NO_EXT") == "1":
        print("gkd: GKD_NO_EXT=1, building no extension (pure-PyTorch fallback)")
        return [], {}
    main_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    if not main_sources:
        return [], {}
    torch = _import_torch_or_exit()
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    cuda_home = _find_cuda_home()
    use_cuda = (
        os.environ.get("GKD_CPU_ONLY") != "1" and cuda_home is not None and torch.version.cuda is not None
        and bool(cuda_sources)
    )
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    # torch >= 2.7 defines Py_LIMITED_API itself for py_limited_api=True extensions; defining it again only warns.
    torch_version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    define_macros = [] if torch_version >= (2, 7) else [("Py_LIMITED_API", "0x03090000")]
    # The torch the extension is compiled against, read back by kd._ops, which refuses to run the kernels under
    # another torch major.minor (libtorch's C++ ABI changes between minor versions; the abi3 tag only covers Python).
    define_macros += [("KD_TORCH_MAJOR", str(torch_version[0])), ("KD_TORCH_MINOR", str(torch_version[1]))]
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        extra_compile_args["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            "gkd.kd._C",
            main_sources + cpu_sources + cuda_sources,
            include_dirs=_nvidia_include_dirs(torch),
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            define_macros=define_macros + [("WITH_CUDA", None)],
            py_limited_api=True,
        )
        print(f"gkd: building gkd.kd._C with CUDA (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})")
    else:
        ext = cpp_extension.CppExtension(
            "gkd.kd._C",
            main_sources + cpu_sources,
            extra_compile_args={"cxx": extra_compile_args["cxx"]},
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
            py_limited_api=True,
        )
        print("gkd: building gkd.kd._C for CPU only (no nvcc found or GKD_CPU_ONLY=1)")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
packages, package_dir = _packages()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"gkd.kd": ["csrc/*.cpp", "csrc/*.h", "csrc/*/*.cpp", "csrc/*/*.cu", "csrc/*/*.h",
                             "configs/*.yaml", "configs/*/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)

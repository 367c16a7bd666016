"""Build fluid_ops: setuptools drives CMake + ninja for the two compiled modules.

Environment knobs:
  FLUID_OPS_CUDA=0|1        skip the CUDA module / require it (default: build it when nvcc is found)
  FLUID_OPS_CUDA_ARCHS=...  CMake CUDA_ARCHITECTURES list (default 80-real;89-real;90a-real;90-virtual)
  FLUID_OPS_BUILD_JOBS=N    parallel compile jobs (default: CPU count)
  FLUID_OPS_DEBUG=1         -O0 -g build
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80-real;89-real;90a-real;90-virtual"  # as CMakeLists.txt


def find_nvcc():
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if cand and Path(cand).exists():
            return cand
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def want_cuda():
    flag = os.environ.get("FLUID_OPS_CUDA", "").strip()
    nvcc = find_nvcc()
    if flag == "0":
        return None
    if flag == "1" and nvcc is None:
        raise RuntimeError(
            "FLUID_OPS_CUDA=1 but nvcc was not found (looked at $CUDACXX, PATH, $CUDA_HOME/bin, "
            "/usr/local/cuda/bin). Install the CUDA toolkit or set FLUID_OPS_CUDA=0."
        )
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"FLUID_OPS_CUDA must be 0 or 1, got {flag!r}")
    return nvcc


class CMakeExtension(Extension):
    def __init__(self, name, target):
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        nvcc = want_cuda()
        debug = os.environ.get("FLUID_OPS_DEBUG") == "1"
        # A CMake tree that outlives the build: pip's editable builds get a fresh temporary
        # build_temp each time, so a one-file change to csrc/ would recompile everything.
        build_dir = ROOT / "build" / (f"cmake-{sys.implementation.cache_tag}-{'cuda' if nvcc else 'cpu'}"
                                      f"{'-debug' if debug else ''}")
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={'Debug' if debug else 'Release'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFLUID_OPS_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if nvcc:
            cfg.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            # always passed: the kept CMake cache would otherwise hold the last build's list
            archs = os.environ.get("FLUID_OPS_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
            cfg.append(f"-DFLUID_OPS_CUDA_ARCHS={archs}")
        jobs = os.environ.get("FLUID_OPS_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(cfg)
        subprocess.check_call(
            ["cmake", "--build", str(build_dir), "--target", ext.target, "-j", jobs]
        )


ext_modules = [CMakeExtension("fluid_ops._C", "_C")]
if want_cuda():
    ext_modules.append(CMakeExtension("fluid_ops._C_cuda", "_C_cuda"))

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})

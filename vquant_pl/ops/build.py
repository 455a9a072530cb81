"""Building the native kernels: folders, names, locks, compile and load.

A build lives in `<build root>/<name>/`: the root is `$VQUANT_BUILD_DIR`, else
`$XDG_CACHE_HOME/vquant_pl` (~/.cache); the name carries the kind, the package version, a
hash of the sources, flags and torch's version, and for CUDA the target GPU architectures
(`vquant_cuda_0_1_0_sm80_90ptx_<hash>`), so a build is only reused where it was made for.
A folder holds one finished build when it has `BUILD_OK` and the `.so`; builds run under a
file lock in their folder, so two processes never compile into one folder.

Native code is only loaded from folders that cannot hold someone else's code: new folders
are created private (0700), and a build root, build folder or library owned by another user
(root excepted) or writable by group or others (a root may be a sticky folder like /tmp) is
refused with the reason. A folder that cannot be written and has no finished build is
reported the same way; the caller (`vquant_pl.ops.kernels`) then runs the PyTorch fallback
with one warning.

Example:
    >>> from vquant_pl.ops import build
    >>> build.build_name("cpu")  # doctest: +SKIP
    'vquant_cpu_0_1_0_28e332d4415a'
    >>> build.build("cpu")  # doctest: +SKIP
    PosixPath('/root/.cache/vquant_pl/vquant_cpu_0_1_0_28e332d4415a/vquant_cpu_0_1_0_28e332d4415a.so')
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import sys
import time
import warnings
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch

ENV_BUILD_DIR = "VQUANT_BUILD_DIR"
ENV_VERBOSE = "VQUANT_VERBOSE_BUILD"
ENV_ARCHS = "TORCH_CUDA_ARCH_LIST"
KINDS = ("cpu", "cuda", "emulation")
# First builds measured on a 2-core x86_64 (g++, nvcc 13.0 for one architecture), shown in the build message.
BUILD_SECONDS = {"cpu": 45, "cuda": 120, "emulation": 25}
_SOURCES = {
    "cpu": ("ops.cpp", "squant_cpu.cpp", "fake_quant_cpu.cpp"),
    "cuda": ("squant_cuda.cu", "fake_quant_cuda.cu", "register_cuda.cpp"),
    "emulation": ("cuda_emulation_build.cpp",),
}
_FLAGS = {
    "cpu": dict(extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"]),
    "cuda": dict(extra_cflags=["-O3", "-ffp-contract=off"], extra_cuda_cflags=["-O3", "--fmad=false"]),
    "emulation": dict(extra_cflags=["-O2", "-fopenmp", "-ffp-contract=off", "-DVQUANT_CUDA_EMULATION"],
                      extra_ldflags=["-fopenmp"], with_cuda=False),
}
_LOGGER = "torch.utils.cpp_extension"


class BackendUnavailable(RuntimeError):
    """A native backend could not be built or cannot run here."""


# ----------------------------------------------------------------------------- folders, names
def source_dir() -> Path:
    """The folder of the C++/CUDA sources (installed as `vquant_pl.csrc`)."""
    return Path(str(resources.files("vquant_pl.csrc")))


def package_version() -> str:
    """The installed version of vquant-pl (`0+unknown` for a plain checkout on sys.path)."""
    try:
        from importlib.metadata import version

        return version("vquant-pl")
    except Exception:  # not installed
        return "0+unknown"


def build_root() -> Path:
    """Where builds go: `$VQUANT_BUILD_DIR`, else `$XDG_CACHE_HOME/vquant_pl` (~/.cache)."""
    if os.environ.get(ENV_BUILD_DIR):
        return Path(os.environ[ENV_BUILD_DIR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vquant_pl"


def cuda_archs() -> tuple[str, ...]:
    """The GPU architectures a CUDA build targets, chosen as `torch.utils.cpp_extension` does:
    `$TORCH_CUDA_ARCH_LIST` (";" or " " separated, e.g. `8.0;9.0+PTX`), else the capability of
    every visible GPU (clamped to what this torch supports), the highest also as PTX.

    Returns:
        The architectures, sorted and without repeats; empty without a GPU and without
        `$TORCH_CUDA_ARCH_LIST` (nothing to build for).

    Example:
        >>> os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0 8.0"; cuda_archs()  # doctest: +SKIP
        ('8.0', '9.0')
    """
    listed = os.environ.get(ENV_ARCHS, "").strip()
    if listed and listed != "native":
        return tuple(sorted({a for a in re.split(r"[;\s]+", listed) if a}, key=_arch_order))
    if not torch.cuda.is_available():
        return ()
    supported = [int(m.group(1)) for a in torch.cuda.get_arch_list() if (m := re.fullmatch(r"sm_(\d+)\w*", a))]
    top = max(((s // 10, s % 10) for s in supported), default=(99, 9))
    found = sorted({min(torch.cuda.get_device_capability(i), top) for i in range(torch.cuda.device_count())})
    names = [f"{major}.{minor}" for major, minor in found]
    return tuple(names[:-1] + [names[-1] + "+PTX"]) if names else ()


def _arch_order(arch: str) -> tuple:
    """`8.0` < `9.0+PTX` < `10.0`; names (`Hopper`) after the numbers."""
    numbers = re.match(r"(\d+)\.(\d+)", arch)
    return (0, int(numbers[1]), int(numbers[2]), arch) if numbers else (1, 0, 0, arch)


def arch_tag(archs: tuple[str, ...]) -> str:
    """The architectures as a name part: `('8.0', '9.0+PTX')` -> `sm80_90ptx` (`sm_none`: none)."""
    tokens = [re.sub(r"[^0-9a-z]", "", a.lower()) for a in archs]
    return "sm" + "_".join(tokens) if tokens else "sm_none"


def build_name(kind: str, src: Path | str | None = None, defines: tuple[str, ...] = (),
               archs: tuple[str, ...] | None = None) -> str:
    """`vquant_<kind>_<package version>_<hash>` (CUDA: `vquant_cuda_<version>_<arch tag>_<hash>`):
    the hash covers every file of the source folder, the flags, torch's and Python's versions,
    so any change builds anew; the CUDA name names the target architectures (`cuda_archs()`
    unless `archs` is given), so a build for one GPU generation is never loaded on another.

    Example:
        >>> build_name("cuda", archs=("9.0+PTX",))  # doctest: +SKIP
        'vquant_cuda_0_1_0_sm90ptx_f3c37e2777aa'
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel library {kind!r}; expected one of {', '.join(KINDS)}")
    src = Path(src or source_dir())
    digest = hashlib.sha256()
    for path in sorted(p for p in src.iterdir() if p.suffix in (".h", ".cpp", ".cu")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(repr((kind, _SOURCES[kind], _FLAGS[kind], defines, torch.__version__, torch.version.cuda,
                        sys.version_info[:2])).encode())
    version = re.sub(r"[^0-9A-Za-z]+", "_", package_version())
    archs_part = f"{arch_tag(cuda_archs() if archs is None else archs)}_" if kind == "cuda" else ""
    return f"vquant_{kind}_{version}_{archs_part}{digest.hexdigest()[:12]}"


# ------------------------------------------------------------------------------------ trust
def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def untrusted(path: Path, sticky_ok: bool = False) -> str | None:
    """Why native code must not be loaded from (or built in) `path`, or None when it is safe:
    it belongs to you or to root and neither group nor others can write it. A folder whose
    sticky bit is set (like /tmp) may be writable by others when `sticky_ok` (a build root:
    others cannot rename or remove your folders in it). Always None where the system has no
    POSIX owners (Windows).

    Example:
        >>> untrusted(Path("/tmp"), sticky_ok=True) is None
        True
    """
    if not hasattr(os, "geteuid"):
        return None
    info = path.stat()
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        return f"{path} belongs to {_user(info.st_uid)}, not to you ({_user(me)})"
    writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (sticky_ok and stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX):
        who = " and ".join(w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if writable & bit)
        return f"{path} is writable by {who} (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _refuse_unless_trusted(path: Path, sticky_ok: bool = False) -> None:
    why = untrusted(path, sticky_ok)
    if why:
        raise BackendUnavailable(f"refusing to load native code from {path}: {why}. Set {ENV_BUILD_DIR} to a "
                                 "folder of your own that only you can write")


# ------------------------------------------------------------------------------------ helpers
def rank_zero() -> bool:
    """True outside distributed runs and on global/local rank 0 (the rank that prints)."""
    return all(os.environ.get(v, "0") in ("", "0") for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _say(message: str) -> None:
    if rank_zero():
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive OS lock (released by the kernel if the holder dies): one build at a time."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's own lock inside cpp_extension.load still applies
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_cpp_extension(quiet: bool = True) -> Iterator[None]:
    """`torch.utils.cpp_extension`'s notes (a missing CUDA runtime, CUDA_HOME, compiler versions) hidden."""
    logger = logging.getLogger(_LOGGER)
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _cpp_extension():
    """`torch.utils.cpp_extension`, imported without its log line about a missing CUDA runtime."""
    with _quiet_cpp_extension():
        from torch.utils import cpp_extension
    return cpp_extension


def find_cuda_home() -> str | None:
    """A CUDA toolkit with headers: $CUDA_HOME, torch's guess, nvcc's real location, /usr/local/cuda."""
    cpp_extension = _cpp_extension()
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME,
                  nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


# ------------------------------------------------------------------------------ build and load
def runs_on(archs: tuple[str, ...], capability: tuple[int, int]) -> bool:
    """Whether a CUDA build for `archs` has code for a GPU of `capability`: a cubin for X.y
    runs on X.z with z >= y (an arch-specific `X.ya` one on X.y only), PTX for X.y on any
    GPU from X.y on (compiled by the driver).

    Example:
        >>> runs_on(("8.0", "9.0"), (8, 6)), runs_on(("8.0", "9.0"), (10, 0)), runs_on(("8.0+PTX",), (10, 0))
        (True, False, True)
    """
    for arch in archs:
        m = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", arch)
        if m is None:
            continue
        built = (int(m[1]), int(m[2]))
        if (m[4] and built <= tuple(capability)) or (built[0] == capability[0] and (
                built[1] == capability[1] if m[3] else built[1] <= capability[1])):
            return True
    return False


def _covering_build(root: Path, name: str) -> str | None:
    """A finished, trusted CUDA build of the same sources for other architectures that has code
    for every visible GPU (its architectures are in its BUILD_OK), or None."""
    version, digest = name.split("_sm", 1)[0], name.rsplit("_", 1)[1]
    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    for folder in sorted(root.glob(f"{version}_sm*_{digest}")) if capabilities else ():
        try:
            lines = (folder / "BUILD_OK").read_text().splitlines()
            archs = tuple(next(line[6:] for line in lines if line.startswith("archs ")).split(";"))
            usable = (folder / f"{folder.name}.so").is_file() and not (untrusted(root, True) or untrusted(folder)
                                                                         or untrusted(folder / f"{folder.name}.so"))
        except (OSError, StopIteration):
            continue
        if usable and all(runs_on(archs, c) for c in capabilities):
            return folder.name
    return None


def build(kind: str, src: Path | str | None = None, defines: tuple[str, ...] = (),
          verbose: bool | None = None) -> Path:
    """Build (first time only) and load the library `kind` (`cpu`, `cuda`, `emulation`) from
    `src` (default: the package's sources); returns the path of the shared library.

    Args:
        kind: which library.
        src: the source folder (tests build modified copies).
        defines: extra `-D` definitions (e.g. `("VQ_EMU_NS=vquant_emu_bug",)`).
        verbose: show the compiler's output (default: `$VQUANT_VERBOSE_BUILD == "1"`).

    Raises:
        BackendUnavailable: no compiler, ninja, CUDA toolkit or GPU architecture, a compile
            error, a build folder that cannot be created or written (without a finished build
            in it), or one that is not safe to load from (someone else's, or writable by
            others); the message names the folder and the reason.

    Example:
        >>> build("cpu").name  # doctest: +SKIP
        'vquant_cpu_0_1_0_28e332d4415a.so'
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel library {kind!r}; expected one of {', '.join(KINDS)}")
    src = Path(src or source_dir())
    archs = cuda_archs() if kind == "cuda" else ()
    name = build_name(kind, src, defines, archs)
    root = build_root()
    if kind == "cuda" and os.environ.get(ENV_ARCHS, "native").strip() in ("", "native"):
        name = _covering_build(root, name) or name  # e.g. a prebuilt image's 8.0;9.0 on a 9.0 GPU
    folder = root / name
    library = folder / f"{name}.so"
    done = folder / "BUILD_OK"
    if kind == "cuda" and not archs:
        raise BackendUnavailable(f"no GPU visible and {ENV_ARCHS} not set: no CUDA architecture to build for "
                                 f"(set {ENV_ARCHS}, e.g. '9.0', or run `vquant build-kernels --arch 9.0`)")
    for path, sticky_ok in ((root, True), (folder, False)):
        try:
            path.mkdir(mode=0o700, parents=path is root, exist_ok=True)  # above the root: the user's umask
        except OSError as err:
            raise BackendUnavailable(f"cannot create the build folder {path}: {err}") from err
        _refuse_unless_trusted(path, sticky_ok)
    if not (done.is_file() and library.is_file()):
        try:
            with _file_lock(folder / "vquant.lock"):
                if not (done.is_file() and library.is_file()):  # another process may have built it meanwhile
                    _compile(kind, src, name, folder, defines, verbose, archs)
                    done.write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\narchs {';'.join(archs)}\n")
        except OSError as err:  # a read-only folder or file system, a full disk
            raise BackendUnavailable(
                f"the build folder {folder} has no finished build and cannot be written ({err}); set "
                f"{ENV_BUILD_DIR} to a writable folder of your own, or build there ahead with "
                "`vquant build-kernels`") from err
    _refuse_unless_trusted(library)
    try:
        torch.ops.load_library(str(library))
    except OSError as err:
        raise BackendUnavailable(f"cannot load {library}: {err}") from err
    return library


def _compile(kind: str, src: Path, name: str, folder: Path, defines: tuple[str, ...], verbose: bool | None,
             archs: tuple[str, ...] = ()) -> None:
    cpp_extension = _cpp_extension()

    flags = {k: list(v) if isinstance(v, list) else v for k, v in _FLAGS[kind].items()}
    flags["extra_cflags"] = flags["extra_cflags"] + [f"-D{d}" for d in defines]
    if kind == "cuda":
        home = find_cuda_home()
        if home is None:
            raise BackendUnavailable("no CUDA toolkit with headers found (nvcc); set CUDA_HOME")
        cpp_extension.CUDA_HOME = home  # torch guesses from `which nvcc`, which may be a wrapper
    if verbose is None:
        verbose = os.environ.get(ENV_VERBOSE) == "1"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BackendUnavailable(f"no C++ compiler: {compiler!r} is not on PATH (install g++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise BackendUnavailable("ninja is not installed (pip install ninja)")
    _say(f"vquant_pl: building the native kernels (first use only, about {BUILD_SECONDS[kind]} s): "
         f"{kind} library in {folder}")
    start = time.perf_counter()
    listed = os.environ.get(ENV_ARCHS)
    if kind == "cuda":
        os.environ[ENV_ARCHS] = ";".join(archs)  # exactly the architectures the folder's name says
    try:
        with _quiet_cpp_extension(not verbose), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpp_extension.load(name=name, sources=[str(src / f) for f in _SOURCES[kind]], build_directory=str(folder),
                               extra_include_paths=[str(src)], is_python_module=False, verbose=verbose, **flags)
    except Exception as err:  # a compile error, a missing toolkit header, ...
        raise BackendUnavailable(f"could not build the {kind} kernels: {_summary(err)}") from err
    finally:
        if kind == "cuda":
            if listed is None:
                os.environ.pop(ENV_ARCHS, None)
            else:
                os.environ[ENV_ARCHS] = listed
    _say(f"vquant_pl: built the {kind} kernels in {time.perf_counter() - start:.0f} s")


def _summary(err: BaseException, limit: int = 600) -> str:
    """The lines of a build log that say what went wrong (errors first), shortened."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    wanted = [line for line in lines if re.search(r"error|not found|no such file|fatal", line, re.IGNORECASE)
              and not line.startswith(("FAILED:", "ninja:"))]
    text = " | ".join(dict.fromkeys(wanted[:4] or lines[-3:]))
    return text if len(text) <= limit else text[:limit] + " ..."

"""The native kernels' build: names (version, source hash, CUDA architectures), one build at a
time, private folders, and refusal of folders that could hold someone else's code."""
import json
import os
import shutil
import stat
import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch

from vquant_pl.ops import build, kernels

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
NOBODY = 65534


def _copy_sources(dst: Path) -> Path:
    dst.mkdir()
    for f in build.source_dir().iterdir():
        if f.suffix in (".h", ".cpp", ".cu"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """Builds into `tmp_path/root` with a compile that writes an empty library, and a
    `load_library` that records what it was asked to load."""
    monkeypatch.setenv("VQUANT_BUILD_DIR", str(tmp_path / "root"))
    compiled, loaded = [], []

    def fake_compile(kind, src, name, folder, defines, verbose, archs=()):
        compiled.append(name)
        (folder / f"{name}.so").write_bytes(b"")

    monkeypatch.setattr(build, "_compile", fake_compile)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    return tmp_path / "root", compiled, loaded


def _plant(root: Path, name: str, mode: int = 0o755) -> Path:
    """A finished-looking build folder: BUILD_OK and a library (someone else's code)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "BUILD_OK").write_text("planted\n")
    (folder / f"{name}.so").write_bytes(b"planted")
    folder.chmod(mode)
    return folder


def _gpus(monkeypatch, *capabilities):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90", "sm_100"])


# ------------------------------------------------------------------------------------- names
def test_build_name_carries_version_and_source_hash(tmp_path):
    src = _copy_sources(tmp_path / "csrc")
    name = build.build_name("cpu", src)
    version = build.package_version().replace(".", "_").replace("+", "_")
    assert name.startswith(f"vquant_cpu_{version}_") and name == kernels.build_name("cpu")
    (src / "squant_cpu.cpp").write_text((src / "squant_cpu.cpp").read_text() + "\n// changed\n")
    assert build.build_name("cpu", src) != name
    assert build.build_name("cuda") != build.build_name("cpu")


def test_cuda_build_name_names_the_target_architectures(monkeypatch):
    """Issue 18 item 20: a build for 8.0 is never the folder a 9.0 or 10.0 GPU loads."""
    names = {}
    for listed in ("8.0", "9.0", "10.0", "9.0;8.0", "8.0 9.0", "8.0;9.0+PTX"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", listed)
        names[listed] = build.build_name("cuda")
    version = build.package_version().replace(".", "_").replace("+", "_")
    assert names["8.0"].startswith(f"vquant_cuda_{version}_sm80_")
    assert "_sm90_" in names["9.0"] and "_sm100_" in names["10.0"] and "_sm80_90ptx_" in names["8.0;9.0+PTX"]
    assert names["9.0;8.0"] == names["8.0 9.0"] and "_sm80_90_" in names["8.0 9.0"]
    assert len({names[k] for k in ("8.0", "9.0", "10.0", "8.0 9.0", "8.0;9.0+PTX")}) == 5
    # the architectures are not in the hash: only the architecture part differs
    assert {n.rsplit("_", 1)[1] for n in names.values()} == {names["8.0"].rsplit("_", 1)[1]}
    assert build.build_name("cpu") == build.build_name("cpu", archs=("9.0",))  # CPU builds have none


def test_cuda_architectures_of_the_visible_gpus(monkeypatch):
    """Without TORCH_CUDA_ARCH_LIST, what torch.utils.cpp_extension builds for: every visible
    GPU's capability, clamped to this torch's newest, the highest also as PTX."""
    _gpus(monkeypatch, (9, 0), (8, 0), (9, 0), (12, 0))
    assert build.cuda_archs() == ("8.0", "9.0", "10.0+PTX")
    assert "_sm80_90_100ptx_" in build.build_name("cuda")
    _gpus(monkeypatch, (9, 0))
    assert build.cuda_archs() == ("9.0+PTX",) and "_sm90ptx_" in build.build_name("cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")  # torch's word for the same
    assert build.cuda_archs() == ("9.0+PTX",)


def test_cuda_compile_targets_exactly_the_named_architectures(tmp_path, monkeypatch):
    """The folder's name and torch's -gencode flags come from one list."""
    from torch.utils import cpp_extension

    seen = []
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")  # what the user set is back afterwards
    monkeypatch.setattr(build, "find_cuda_home", lambda: "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # _compile sets it
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.append(os.environ["TORCH_CUDA_ARCH_LIST"]))
    monkeypatch.setattr(build, "_say", lambda message: None)
    monkeypatch.setattr(build.shutil, "which", lambda name: "/usr/bin/" + name)
    build._compile("cuda", build.source_dir(), "x", tmp_path, (), False, ("8.0", "9.0+PTX"))
    assert seen == ["8.0;9.0+PTX"] and os.environ["TORCH_CUDA_ARCH_LIST"] == "Hopper"


def test_cuda_build_without_a_target_architecture_says_so(fake_build, monkeypatch):
    root, compiled, _ = fake_build
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(build.BackendUnavailable, match="no GPU visible and TORCH_CUDA_ARCH_LIST not set"):
        build.build("cuda")
    assert compiled == [] and not root.exists()


def test_a_build_is_reused_only_on_gpus_it_has_code_for(fake_build, monkeypatch):
    """Issue 18 item 20: the 8.0 build is not loaded on 9.0 or 10.0 GPUs; a prebuilt image's
    `8.0;9.0` build (`vquant build-kernels` without a GPU) is loaded on a 9.0 GPU and on an
    8.6 one (cubin compatibility), each GPU generation otherwise builds its own."""
    root, compiled, loaded = fake_build
    for listed in ("8.0", "8.0;9.0"):  # prebuilt, as `vquant build-kernels --arch ...` does
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", listed)
        build.build("cuda")
    prebuilt = {n: root / n / f"{n}.so" for n in compiled}
    assert [n.split("_sm")[1].split("_")[:-1] for n in compiled] == [["80"], ["80", "90"]]
    assert (root / compiled[1] / "BUILD_OK").read_text().splitlines()[1] == "archs 8.0;9.0"
    loaded.clear()
    for capabilities in [((9, 0),), ((8, 6), (9, 0))]:
        _gpus(monkeypatch, *capabilities)
        assert build.build("cuda") == prebuilt[compiled[1]]  # not the 8.0 one, not a new build
    assert len(compiled) == 2 and loaded == [str(prebuilt[compiled[1]])] * 2
    _gpus(monkeypatch, (10, 0))
    library = build.build("cuda")
    assert len(compiled) == 3 and library.parent.name == compiled[2] and "_sm100ptx_" in compiled[2]
    assert build.runs_on(("8.0",), (8, 6)) and not build.runs_on(("8.0",), (9, 0))
    assert build.runs_on(("8.0+PTX",), (10, 0)) and not build.runs_on(("9.0a",), (9, 1))


# ------------------------------------------------------------------------------ build, reuse
def test_a_finished_build_is_loaded_not_rebuilt(monkeypatch):
    if kernels.ops() is not torch.ops.vquant:
        pytest.skip(f"no native build to reuse: {kernels.status()['cpu']}")

    def no_compile(*args, **kwargs):
        raise AssertionError("rebuilt a finished build")

    monkeypatch.setattr(build, "_compile", no_compile)
    path = build.build("cpu")
    assert path.name == build.build_name("cpu") + ".so" and (path.parent / "BUILD_OK").is_file()


def test_builds_are_serialized_by_a_file_lock(fake_build):
    root, compiled, loaded = fake_build
    name = build.build_name("cpu")
    (root / name).mkdir(mode=0o700, parents=True)
    with build._file_lock(root / name / "vquant.lock"):  # another process is building
        builder = threading.Thread(target=build.build, args=("cpu",))
        builder.start()
        builder.join(0.5)
        assert compiled == []  # waits for the lock
    builder.join(30)
    assert compiled == [name]
    build.build("cpu")
    assert compiled == [name] and loaded == [str(root / name / f"{name}.so")] * 2  # built once, then loaded


# ---------------------------------------------------------------- private folders, refusal
def test_new_build_folders_are_private(fake_build):
    """Issue 18 item 21: the root and the build folder are created 0700."""
    root, compiled, loaded = fake_build
    library = build.build("cpu")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(library.parent.stat().st_mode) == 0o700
    assert compiled == [build.build_name("cpu")] and loaded == [str(library)]


@pytest.mark.parametrize("what", ["folder", "library", "root"])
def test_refuses_code_others_can_write(fake_build, what):
    """A planted BUILD_OK + .so in a folder that group or others can write is never loaded."""
    root, compiled, loaded = fake_build
    name = build.build_name("cpu")
    folder = _plant(root, name)
    if what == "folder":
        folder.chmod(0o777)
        why = rf"{folder} is writable by group and others \(mode 0777\)"
    elif what == "library":
        (folder / f"{name}.so").chmod(0o646)
        why = rf"{folder / name}.so is writable by others \(mode 0646\)"
    else:  # others may rename the folder away and put theirs in its place
        root.chmod(0o775)
        why = rf"{root} is writable by group \(mode 0775\)"
    with pytest.raises(build.BackendUnavailable, match=rf"refusing to load native code from .*: {why}\. "
                                                       "Set VQUANT_BUILD_DIR to a folder of your own"):
        build.build("cpu")
    assert loaded == [] and compiled == []


def test_a_sticky_shared_root_is_fine(fake_build):
    """/tmp-like roots (others may write, sticky bit set): your own private folder in it is used."""
    root, _, loaded = fake_build
    root.mkdir()
    root.chmod(0o1777)
    assert build.untrusted(root, sticky_ok=True) is None and build.untrusted(root) is not None
    library = build.build("cpu")
    assert loaded == [str(library)] and stat.S_IMODE(library.parent.stat().st_mode) == 0o700


@pytest.mark.skipif(not ROOT, reason="handing a folder to another user needs root (chown)")
def test_refuses_a_folder_of_another_user(fake_build):
    root, compiled, loaded = fake_build
    name = build.build_name("cpu")
    folder = _plant(root, name)
    for path in (folder, folder / "BUILD_OK", folder / f"{name}.so"):
        os.chown(path, NOBODY, NOBODY)
    with pytest.raises(build.BackendUnavailable, match=rf"refusing to load native code from {folder}: "
                                                       rf"{folder} belongs to .*uid {NOBODY}\), not to you"):
        build.build("cpu")
    assert loaded == [] and compiled == []


def test_a_refused_folder_gives_the_pytorch_path_with_one_warning(fake_build, monkeypatch):
    """The end to end view: say why (once), then the PyTorch operators (identical results)."""
    root, _, loaded = fake_build
    _plant(root, build.build_name("cpu"), 0o777)
    monkeypatch.setitem(kernels._state, "cpu", None)
    monkeypatch.setitem(kernels.attempts, "cpu", 0)
    monkeypatch.delenv("VQUANT_BACKEND", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.ops() is torch.ops.vquant_py and kernels.ops() is torch.ops.vquant_py
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "native kernels are unavailable (refusing to load native code" in messages[0]
    assert "writable by group and others" in messages[0] and kernels.attempts["cpu"] == 1 and loaded == []


# ---------------------------------------------------------------------- read-only folders
def _in_unprivileged_child(function) -> dict:
    """Run `function()` (returning a JSON-able dict) in a forked child, as user nobody when we
    are root (root writes through any permission bits); returns its dict or its error."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            if ROOT:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            result = function()
        except BaseException as err:  # noqa: BLE001  (reported to the parent)
            result = {"error": f"{type(err).__name__}: {err}"}
        with os.fdopen(write, "w") as out:
            json.dump(result, out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(text)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (POSIX)")
def test_read_only_folder_without_a_build_falls_back_with_one_warning(monkeypatch):
    """Issue 18 item 19: a build folder you cannot write (a prebuilt image's, a read-only
    mount) without a finished build: the PyTorch path and one warning naming the folder, no
    OSError on the lock file."""
    root = Path(tempfile.mkdtemp(prefix="vquant-ro-"))  # not under pytest's 0700 tmp root: nobody reads it
    sources = None
    try:
        root.chmod(0o755)
        name = build.build_name("cpu")
        folder = root / name
        folder.mkdir()
        folder.chmod(0o555)  # root's 0555 stops nobody; our own 0555 stops us
        monkeypatch.setenv("VQUANT_BUILD_DIR", str(root))
        monkeypatch.delenv("VQUANT_BACKEND", raising=False)
        # the child runs as nobody, who may not read the checkout (a clone under a 0700 mktemp
        # folder): it hashes a world-readable copy of the sources, which gives the same name
        sources = Path(tempfile.mkdtemp(prefix="vquant-src-"))
        sources.chmod(0o755)
        for path in build.source_dir().iterdir():
            if path.is_file():
                shutil.copy(path, sources / path.name)
                (sources / path.name).chmod(0o644)
        monkeypatch.setattr(build, "source_dir", lambda: sources)
        version = build.package_version()  # nor, then, the installed package's metadata
        monkeypatch.setattr(build, "package_version", lambda: version)
        assert build.build_name("cpu") == name
        monkeypatch.setitem(kernels._state, "cpu", None)
        monkeypatch.setitem(kernels.attempts, "cpu", 0)
        monkeypatch.setattr(build, "_compile", lambda *a, **k: pytest.fail("compiled into a read-only folder"))

        def child():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ops = str(kernels.ops())
            return {"name": build.build_name("cpu"), "ops": ops, "attempts": kernels.attempts["cpu"],
                    "warnings": [str(w.message) for w in caught]}

        result = _in_unprivileged_child(child)
        assert "error" not in result, result["error"]
        assert result["name"] == name and result["ops"] == str(torch.ops.vquant_py) and result["attempts"] == 1
        assert len(result["warnings"]) == 1, result["warnings"]
        assert f"the build folder {folder} has no finished build and cannot be written" in result["warnings"][0]
        assert "Permission denied" in result["warnings"][0] and "set VQUANT_BUILD_DIR" in result["warnings"][0]
        assert sorted(os.listdir(folder)) == []  # nothing written
    finally:
        folder.chmod(0o755)
        shutil.rmtree(root)
        if sources is not None:
            shutil.rmtree(sources, ignore_errors=True)

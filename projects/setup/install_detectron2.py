#!/usr/bin/env python
"""Install the real Detectron2 into the current Python environment.

1. Upstream: if its Git repository answers within ``--timeout`` seconds, build and install
   ``git+https://github.com/facebookresearch/detectron2.git@<ref>`` (the CPU build takes ~1 min).
   ``--upstream-src`` takes another source: a Git URL, a local Git checkout (installed at ``--ref``
   through ``git+file://``, so pip records its commit) or a local source directory without Git
   (installed as it is). A given ``--upstream-src`` implies ``--source upstream``.
2. Registry fallback (machines that reach only package registries): ``pb1-detectron2==0.6``, whose
   Python files are identical to upstream tag v0.6 but whose sdist lacks ``detectron2/layers/csrc``,
   so a plain ``pip install`` fails. We take its sources unchanged and install them as a
   pure-Python distribution named ``detectron2`` (``pip show/uninstall detectron2`` work), adding a
   ``detectron2/_C.py`` placeholder whose attribute access raises an ImportError naming the C++ op.
   Panoptic SegFormer uses none of Detectron2's C++ ops.

An existing ``detectron2`` is replaced (pip builds the new one first, so a failed build keeps the old
one). After installing, a fresh interpreter imports ``detectron2`` and must find the one just installed
(fallback: its ``_C`` placeholder; upstream: compiled ops and the source recorded by pip), else the
script exits with an error. Prints one line ``Installed detectron2 <version> from <source>`` at the
end; ``python -m panoptic_segformer.collect_env`` reports the same.
"""
import argparse
import glob
import hashlib
import json
import os
import ssl
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request

UPSTREAM_URL = "https://github.com/facebookresearch/detectron2.git"
DEFAULT_REF = "main"
FALLBACK_REQUIREMENT = "pb1-detectron2==0.6"
FALLBACK_SDIST = "pb1-detectron2-0.6.tar.gz"
FALLBACK_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

# Dependencies of Detectron2 v0.6 (its setup.py), with the two caps v0.6 needs on current Python:
# Pillow<10 (it uses Image.LINEAR) and setuptools<81 (model_zoo imports pkg_resources).
FALLBACK_INSTALL_REQUIRES = [
    "Pillow>=7.1,<10",
    "setuptools<81",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
    "black",
]

# Same mapping as upstream's setup.py: small projects installed under detectron2.projects.
PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}

PLACEHOLDER_C = '''"""Placeholder for Detectron2's compiled C++/CUDA extension (written by Panoptic SegFormer's
projects/setup/install_detectron2.py). This Detectron2 was installed from the registry package
pb1-detectron2==0.6, whose source distribution lacks detectron2/layers/csrc, so no op is built.
Any attempt to use one raises an ImportError naming it. The three build-information functions
that Detectron2's collect_env (and so default_setup) calls answer "not built" instead."""

IS_PLACEHOLDER = True
_NOT_BUILT = "not built (registry fallback pb1-detectron2==0.6, pure Python)"


def get_compiler_version():
    return _NOT_BUILT


def get_cuda_version():
    return _NOT_BUILT


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise ImportError(
        f"detectron2._C.{name}: Detectron2's C++ ops are not built in this installation "
        "(registry fallback pb1-detectron2==0.6 installed as pure Python). Install Detectron2 from "
        "its Git repository to use this op."
    )
'''

SETUP_PY = '''from setuptools import setup, find_packages
PROJECTS = {projects!r}
setup(
    name="detectron2",
    version="0.6",
    author="FAIR",
    url="https://github.com/facebookresearch/detectron2",
    description="Detectron2 v0.6 (pure Python: sources of pb1-detectron2==0.6, C++ ops not built)",
    packages=find_packages(exclude=("configs", "tests*", "projects*", "tools*")) + list(PROJECTS),
    package_dir=PROJECTS,
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    python_requires=">=3.6",
    install_requires={requires!r},
)
'''


def pip(*args, check=True):
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check)


def upstream_reachable(timeout):
    try:
        subprocess.run(
            ["git", "ls-remote", "--exit-code", UPSTREAM_URL, "HEAD"],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return True
    except (subprocess.SubprocessError, OSError):
        return False


def upstream_requirement(src, ref):
    """The pip requirement that installs upstream Detectron2 from `src` at `ref`.

    `src` is a Git URL (``https://``, ``ssh://``, ``git@host:...``, ``file://``, ``git+...``), a local
    Git checkout (installed as ``git+file://<path>@<ref>``, so pip records the commit it built) or a
    local source directory without Git (installed as it is; `ref` must stay the default)."""
    if os.path.isdir(src):
        path = os.path.abspath(src)
        if not os.path.isfile(os.path.join(path, "setup.py")) or not os.path.isdir(os.path.join(path, "detectron2")):
            raise SystemExit(f"install_detectron2: --upstream-src {src}: not a Detectron2 source tree "
                             "(no setup.py and detectron2/ in it)")
        git_dir = subprocess.run(["git", "-C", path, "rev-parse", "--show-toplevel"],
                                 capture_output=True, text=True)
        if git_dir.returncode == 0 and os.path.samefile(git_dir.stdout.strip(), path):
            return f"git+file://{path}@{ref}"
        if ref != DEFAULT_REF:
            raise SystemExit(f"install_detectron2: --ref {ref}: {src} is not a Git checkout, so it is "
                             "installed as it is; drop --ref or give a Git checkout")
        return path
    if "://" in src or src.startswith("git@"):
        return f"{src if src.startswith('git+') else 'git+' + src}@{ref}"
    raise SystemExit(f"install_detectron2: --upstream-src {src}: neither a local directory nor a Git URL")


def _install_replacing(requirement):
    """Install `requirement` as `detectron2`, replacing any installed one, then its dependencies.

    ``--force-reinstall --no-deps`` makes pip build first and then replace an installed detectron2
    even of the same version (upstream and v0.6 both call themselves 0.6; a plain install keeps the
    old one as "already satisfied"). The dependencies are then installed from the new metadata."""
    pip("install", "--no-build-isolation", "--force-reinstall", "--no-deps", requirement)
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('detectron2') or []))"],
        check=True, capture_output=True, text=True, cwd=tempfile.gettempdir(),
    )
    requires = [r for r in out.stdout.splitlines() if r.strip() and "extra ==" not in r]
    if requires:
        pip("install", *requires)


def install_upstream(src, ref):
    requirement = upstream_requirement(src, ref)
    _install_replacing(requirement)
    return f"upstream {requirement}"


def _pip_setting(name, default=None):
    """A pip setting (PIP_<NAME> environment variable, else `pip config get global.<name>`)."""
    value = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if value:
        return value
    out = subprocess.run([sys.executable, "-m", "pip", "config", "get", f"global.{name}"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else default


def download_fallback_sdist(workdir):
    """Fetch the sdist of pb1-detectron2==0.6 from the configured package index (PEP 691 JSON simple
    API) and check its pinned sha256. pip itself is not used: pip >= 24 refuses this sdist's metadata
    (it declares a direct-URL extra)."""
    index = _pip_setting("index-url", "https://pypi.org/simple").rstrip("/")
    cafile = _pip_setting("cert")
    context = ssl.create_default_context(cafile=cafile if cafile and os.path.exists(cafile) else None)
    page = f"{index}/pb1-detectron2/"
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=120, context=context) as response:
        files = json.load(response)["files"]
    urls = [f["url"] for f in files if f["filename"] == FALLBACK_SDIST]
    if not urls:
        raise SystemExit(f"install_detectron2: {FALLBACK_SDIST} is not listed at {page}")
    url = urllib.parse.urljoin(page, urls[0])
    path = os.path.join(workdir, FALLBACK_SDIST)
    print(f"+ download {url}", flush=True)
    with urllib.request.urlopen(url, timeout=300, context=context) as response, open(path, "wb") as f:
        shutil.copyfileobj(response, f)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != FALLBACK_SHA256:
        raise SystemExit(f"install_detectron2: sha256 of {url} is {digest}, expected {FALLBACK_SHA256}")
    return path


def stage_fallback(workdir, requires=FALLBACK_INSTALL_REQUIRES):
    """Unpack the checked sdist into ``workdir/stage``: the Detectron2 sources unchanged, the ``_C``
    placeholder and a pure-Python ``setup.py`` (``install_requires=requires``). Returns that folder,
    which ``pip install`` installs and ``pip wheel`` turns into a wheel (projects/setup/gpu_wheels.py)."""
    with tarfile.open(download_fallback_sdist(workdir)) as tar:
        tar.extractall(workdir, filter="data")
    src = os.path.join(workdir, "pb1-detectron2-0.6")
    stage = os.path.join(workdir, "stage")
    os.makedirs(stage)
    shutil.copytree(os.path.join(src, "detectron2"), os.path.join(stage, "detectron2"))
    for package_dir in PROJECTS.values():
        shutil.copytree(os.path.join(src, package_dir), os.path.join(stage, package_dir))
    c_path = os.path.join(stage, "detectron2", "_C.py")
    if os.path.exists(c_path) or glob.glob(os.path.join(stage, "detectron2", "_C*.so")):
        raise SystemExit("install_detectron2: the sdist unexpectedly ships detectron2._C")
    with open(c_path, "w") as f:
        f.write(PLACEHOLDER_C)
    with open(os.path.join(stage, "setup.py"), "w") as f:
        f.write(SETUP_PY.format(projects=PROJECTS, requires=list(requires)))
    return stage


def install_fallback(workdir):
    stage = stage_fallback(workdir)
    _install_replacing(stage)
    return f"registry fallback {FALLBACK_REQUIREMENT} (pure Python, C++ ops not built)"


VERIFY = """
import importlib.metadata, json, sys
import detectron2
from detectron2 import _C
placeholder = bool(getattr(_C, "IS_PLACEHOLDER", False))
dist = importlib.metadata.distribution("detectron2")
direct = json.loads(dist.read_text("direct_url.json") or "{}")
json.dump({"version": detectron2.__version__, "file": detectron2.__file__, "placeholder": placeholder,
           "dist_version": dist.version, "direct_url": direct}, sys.stdout)
"""


def installed_info():
    """What a fresh interpreter finds as ``detectron2``: version, file, placeholder _C or not, and the
    installed distribution's version and pip ``direct_url.json`` (PEP 610)."""
    out = subprocess.run([sys.executable, "-c", VERIFY], capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise SystemExit(f"install_detectron2: the installed detectron2 does not import:\n{out.stderr}")
    return json.loads(out.stdout)


def check_installed(info, upstream):
    """Exit with an error unless `info` (installed_info) is the Detectron2 just installed: upstream
    (compiled ops) or the registry fallback (placeholder _C)."""
    if info["placeholder"] == upstream:
        expected = "upstream (compiled ops)" if upstream else "the v0.6 registry fallback (placeholder _C)"
        raise SystemExit(f"install_detectron2: expected {expected}, but `import detectron2` finds "
                         f"{info['file']} ({'placeholder _C' if info['placeholder'] else 'compiled ops'})")
    if info["version"] != info["dist_version"]:
        raise SystemExit(f"install_detectron2: `import detectron2` finds {info['file']} (version "
                         f"{info['version']}), not the installed distribution (version {info['dist_version']})")
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds to wait for the upstream Git repository to answer")
    parser.add_argument("--ref", default=DEFAULT_REF, help="upstream Git ref to install")
    parser.add_argument("--source", choices=["auto", "upstream", "fallback"], default="auto")
    parser.add_argument("--upstream-src", default=None, metavar="PATH_OR_URL",
                        help=f"where to get upstream from: a Git URL, a local Git checkout or a local "
                             f"source directory (default {UPSTREAM_URL}); implies --source upstream")
    args = parser.parse_args(argv)
    if args.upstream_src is not None and args.source == "fallback":
        parser.error("--upstream-src is for --source upstream, not --source fallback")

    src = args.upstream_src or UPSTREAM_URL
    use_upstream = args.upstream_src is not None or args.source == "upstream" or (
        args.source == "auto" and upstream_reachable(args.timeout)
    )
    if args.source == "auto" and not use_upstream:
        print(f"install_detectron2: {UPSTREAM_URL} not reachable within {args.timeout:.0f}s; "
              f"using the registry fallback {FALLBACK_REQUIREMENT}", flush=True)
    with tempfile.TemporaryDirectory(prefix="d2-install-") as workdir:
        source = install_upstream(src, args.ref) if use_upstream else install_fallback(workdir)
    info = check_installed(installed_info(), upstream=use_upstream)
    commit = info["direct_url"].get("vcs_info", {}).get("commit_id")
    print(f"Installed detectron2 {info['version']} from {source}" + (f" (commit {commit})" if commit else ""),
          flush=True)


if __name__ == "__main__":
    main()

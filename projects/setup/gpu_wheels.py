#!/usr/bin/env python
"""Build the wheelhouse for an offline GPU machine: ``make gpu-wheels`` -> ``.gpu-wheels/``.

The target is a bare CUDA machine with no package registry: Python 3.12 (CPython, manylinux x86_64)
with torch, torchvision, Triton and the usual scientific stack preinstalled (``TARGET_PREINSTALLED``).
The wheelhouse holds exactly what this project needs there on top of that, and nothing the machine
already has (torch, Triton, numpy, ...):

* ``detectron2`` 0.6: the registry fallback of ``projects/setup/install_detectron2.py`` (sources of
  ``pb1-detectron2==0.6``, sha256-checked, ``_C`` placeholder) as a pure-Python wheel. One line differs
  from v0.6, so that it imports with Pillow >= 10 (the target's Pillow; no Pillow < 10 wheel exists for
  Python 3.12): ``ExtentTransform``'s default ``interp=Image.LINEAR`` becomes ``Image.BILINEAR``, the
  same filter (Pillow < 10 defines ``LINEAR = BILINEAR``; Pillow 10 removed the alias). Its metadata
  drops the ``Pillow<10`` cap accordingly.
* Detectron2's and this project's pure-Python dependencies that the target lacks (fvcore, iopath,
  yacs, termcolor, omegaconf + antlr4 runtime, hydra-core, panopticapi-lite), at the pins of
  ``requirements.txt`` / ``make setup``; sdist-only ones are built into ``py3-none-any`` wheels here.
* ``pycocotools``, the one compiled dependency, downloaded as the cp312 manylinux x86_64 wheel.

The project itself is not a wheel: the suite runs from the carried source tree (repository root on
``PYTHONPATH``). The result is checked: one version per package, only tags that run on the target
(``none-any``, cp312 or abi3 manylinux x86_64), and every requirement of every wheel is met by a
carried wheel of a matching version or by a package of the target (by name: the target's versions
are its own; e.g. Detectron2's ``setuptools<81`` cap is for ``detectron2.model_zoo``'s
``pkg_resources``, which nothing here imports, and panopticapi-lite's ``numpy<2`` pin is ignored as
``make setup`` ignores it). ``NOT_NEEDED`` lists the declared requirements that nothing here imports.
The wheels are installed with ``--no-deps``, so the check, not pip, guards the closure.

    python -m projects.setup.gpu_wheels [--output .gpu-wheels]

On the target (see projects/benchmarks/gpu_suite.sh)::

    python3 -m pip install --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl
    export PYTHONPATH=$PWD:/tmp/site
"""
import argparse
import email.parser
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from projects.setup import install_detectron2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET_PYTHON = "3.12"
TARGET_ABI = "cp312"
# pip matches the manylinux glibc version exactly: list the ones the target's glibc accepts.
TARGET_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# Python packages of the target image that our dependency closure uses (names only: their versions
# are the image's). torch, torchvision and triton come with the image's CUDA build; never carry them.
TARGET_PREINSTALLED = frozenset(canonicalize_name(n) for n in (
    "torch", "torchvision", "triton", "numpy", "scipy", "opencv-python-headless", "pillow", "matplotlib",
    "timm", "tqdm", "tabulate", "cloudpickle", "portalocker", "pyyaml", "tensorboard", "setuptools",
    "packaging", "typing-extensions", "pytest", "psutil", "huggingface-hub", "safetensors", "scikit-image",
))
# Declared requirements that nothing on our code paths imports (so they are not carried).
NOT_NEEDED = {"black": "Detectron2 v0.6: only LazyConfig.save formats the saved config with it",
              "platformdirs": "panopticapi-lite declares it but never imports it"}
# Pure-Python packages to carry, pinned as in requirements.txt (the Makefile's setup pins the others).
FROM_REQUIREMENTS = ("fvcore", "iopath", "yacs", "termcolor", "omegaconf", "hydra-core")
EXTRA_PURE = ("antlr4-python3-runtime==4.9.3",  # omegaconf 2.3 / hydra-core 1.3 need 4.9.*; sdist only
              "panopticapi-lite==0.2.0")  # as `make setup`
BINARY = ("pycocotools",)  # compiled: the target's cp312 manylinux wheel

_VERSION = tuple(int(v) for v in TARGET_PYTHON.split("."))
TARGET_TAGS = frozenset(cpython_tags(_VERSION, [TARGET_ABI], TARGET_PLATFORMS)) | frozenset(
    compatible_tags(_VERSION, TARGET_ABI, TARGET_PLATFORMS))

PILLOW_PATCH = ("detectron2/data/transforms/transform.py",
                "interp=Image.LINEAR, fill=0", "interp=Image.BILINEAR, fill=0")


def pins_from_requirements(names, path=os.path.join(REPO, "requirements.txt")):
    """``name==version`` for each of ``names`` from requirements.txt (an unpinned name is an error)."""
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[canonicalize_name(name)] = f"{name.strip()}=={version.strip()}"
    missing = [n for n in names if canonicalize_name(n) not in pins]
    if missing:
        raise SystemExit(f"gpu_wheels: {path} pins no version of {missing}")
    return [pins[canonicalize_name(n)] for n in names]


def _pip(*args):
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build_detectron2_wheel(output, workdir):
    """The v0.6 fallback as a pure-Python wheel, importable with Pillow >= 10 (see the module doc)."""
    requires = [r for r in install_detectron2.FALLBACK_INSTALL_REQUIRES
                if not r.lower().startswith("pillow")] + ["Pillow>=7.1"]
    stage = install_detectron2.stage_fallback(workdir, requires)
    rel, old, new = PILLOW_PATCH
    path = os.path.join(stage, rel)
    with open(path) as f:
        text = f.read()
    if text.count(old) != 1:
        raise SystemExit(f"gpu_wheels: expected one {old!r} in {rel} of the v0.6 sources")
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    setup_py = os.path.join(stage, "setup.py")
    with open(setup_py) as f:
        text = f.read()
    with open(setup_py, "w") as f:
        f.write(text.replace("C++ ops not built)", f"C++ ops not built; {rel}: Image.LINEAR -> Image.BILINEAR "
                                                   "for Pillow >= 10)"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", output, stage)


def wheel_requirements(path):
    """Requires-Dist entries of a wheel that apply on the target (markers evaluated for CPython
    3.12 on Linux x86_64, no extras)."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if re.match(r"[^/]+\.dist-info/METADATA$", n))
        meta = email.parser.Parser().parsestr(zf.read(name).decode())
    env = dict(default_environment(), python_version=TARGET_PYTHON, python_full_version=TARGET_PYTHON + ".0",
               implementation_name="cpython", platform_python_implementation="CPython",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64", extra="")
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def check_wheelhouse(output):
    """Errors (list of str) of the wheelhouse: tags, duplicates, unmet requirements."""
    errors, carried = [], {}
    wheels = sorted(glob.glob(os.path.join(output, "*.whl")))
    for path in wheels:
        name, version, _, tags = parse_wheel_filename(os.path.basename(path))
        if name in carried:
            errors.append(f"two versions of {name}: {carried[name]} and {version}")
        carried[name] = version
        if not tags & TARGET_TAGS:
            errors.append(f"{os.path.basename(path)}: none of its tags {sorted(map(str, tags))} runs on the target")
        if name in TARGET_PREINSTALLED:
            errors.append(f"{name} is carried but the target already has it")
    for path in wheels:
        for req in wheel_requirements(path):
            name = canonicalize_name(req.name)
            if name in NOT_NEEDED or name in TARGET_PREINSTALLED:
                continue
            if name not in carried:
                errors.append(f"{os.path.basename(path)} requires {req}, which is neither carried nor on the target")
            elif not req.specifier.contains(carried[name], prereleases=True):
                errors.append(f"{os.path.basename(path)} requires {req}, carried is {name} {carried[name]}")
    if not wheels:
        errors.append(f"no wheel in {output}")
    return errors


def build(output):
    if os.path.isdir(output):
        shutil.rmtree(output)
    os.makedirs(output)
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as workdir:
        build_detectron2_wheel(output, workdir)
        pure = pins_from_requirements(FROM_REQUIREMENTS) + list(EXTRA_PURE)
        _pip("wheel", "--no-deps", "-w", output, *pure)
        platforms = [a for p in TARGET_PLATFORMS for a in ("--platform", p)]
        _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", TARGET_PYTHON,
             "--implementation", "cp", "--abi", TARGET_ABI, *platforms, "-d", output,
             *pins_from_requirements(BINARY))
    errors = check_wheelhouse(output)
    if errors:
        raise SystemExit("gpu_wheels: the wheelhouse is not usable on the target:\n  " + "\n  ".join(errors))
    files = sorted(os.listdir(output))
    manifest = {f: os.path.getsize(os.path.join(output, f)) for f in files}
    with open(os.path.join(output, "manifest.json"), "w") as f:
        json.dump({"target": f"CPython {TARGET_PYTHON} manylinux x86_64", "wheels": manifest}, f, indent=1)
    total = sum(manifest.values())
    for name, size in manifest.items():
        print(f"{size / 2**20:8.2f} MiB  {name}")
    print(f"{total / 2**20:8.2f} MiB  in {len(files)} wheels: {output}")
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(REPO, ".gpu-wheels"))
    parser.add_argument("--check-only", action="store_true", help="check an existing wheelhouse")
    args = parser.parse_args(argv)
    if args.check_only:
        errors = check_wheelhouse(args.output)
        print("\n".join(errors) if errors else f"{args.output}: usable on the target")
        return 1 if errors else 0
    build(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

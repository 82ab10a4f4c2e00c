"""The documentation cannot rot: every command in a fenced ``bash`` block of README.md and docs/*.md, and
every complete ``python`` command written inline in their text, is run or has its arguments checked;
every Python block compiles and its imports resolve; every link, anchor and picture exists;
docs/ARCHITECTURE.md names files and names that exist; and the code's pointers into docs/ resolve.

Commands are checked in this process, not in subprocesses (each would cost seconds of imports): a
``python -m MODULE ARGS`` or ``python SCRIPT ARGS`` line is executed as ``python`` would execute it
(``runpy`` with ``__name__ == "__main__"`` and the documented ``sys.argv``) until its own argument parser
has parsed the documented arguments; the parse is then stopped, so no training or download starts. The
parsed config file must exist and the ``KEY VALUE`` overrides must merge into it (an unknown key fails),
and every repository path the command names must exist. The cheap commands run for real:
``collect_env``, ``plot_metrics`` (on metrics files written as Detectron2 writes them) and
``projects.tools.visualize`` (random weights, 2 tiny images). The others are run by the tests named in
``RUN_BY`` (training, evaluation, the demo, ONNX export, the GPU suite's dry run, ...), or need 8 GPUs,
COCO, a GPU or the authors' environment and are checked for their arguments only.
"""
import argparse
import ast
import glob
import importlib
import json
import os
import re
import runpy
import shlex
import sys
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
REPO_DIRS = ("configs/", "projects/", "tests/", "panoptic_segformer/", "docs/")
PYTHONS = re.compile(r"(^|/)python[0-9.]*$")
# Entry points whose documented command is run (not only parsed) by another test of the suite.
RUN_BY = {
    "train_net.py": "tests/test_train.py",
    "projects.demo.demo": "tests/test_inference.py",
    "projects.deploy.export": "tests/test_onnx_export.py",
    "projects.benchmarks.corruption_sweep": "tests/test_corruption_sweep.py",
    "projects.benchmarks.compare_postprocessors": "tests/test_inference.py",
    "projects.benchmarks.overfit": "tests/test_benchmark_tools.py",
    "projects.benchmarks.model_stats": "tests/test_benchmark_tools.py",
    "gpu_suite.sh": "tests/test_gpu_suite.py",
}


def fenced_blocks(path, language):
    """[(first line number, text)] of the ```language blocks of a Markdown file."""
    blocks, current, start = [], None, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            stripped = line.strip()
            if current is None and stripped.startswith("```") and stripped[3:].strip() == language:
                current, start = [], lineno + 1
            elif current is not None and stripped.startswith("```"):
                blocks.append((start, "".join(current)))
                current = None
            elif current is not None:
                current.append(line)
    return blocks


INLINE_COMMAND = re.compile(r"`((?:[A-Z_][A-Z0-9_]*=\S+ )*(?:\.venv/bin/)?python (?:-m \S+|\S+\.py) [^`]+)`")


def documented_commands():
    """(doc:line, argv) of every command line in a bash block (continuation lines joined, comments and
    leading ``VAR=value`` assignments dropped), and of every complete ``python`` command written as inline
    code in the text (with arguments, and without ``...``, ``<...>`` or ``[...]`` placeholders)."""
    commands = []
    for path in DOCS:
        doc = os.path.relpath(path, REPO)
        for start, text in fenced_blocks(path, "bash"):
            lines, i = text.splitlines(), 0
            while i < len(lines):
                first, line = i, lines[i]
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i]
                commands.append((f"{doc}:{start + first}", shlex.split(line, comments=True)))
                i += 1
        with open(path, encoding="utf-8") as f:
            in_fence = False
            for lineno, line in enumerate(f, 1):
                if line.strip().startswith("```"):
                    in_fence = not in_fence
                    continue
                if in_fence:
                    continue
                for command in INLINE_COMMAND.findall(line):
                    if not re.search(r"\.\.\.|[<>\[\]]", command):
                        commands.append((f"{doc}:{lineno}", shlex.split(command)))
    for i, (where, argv) in enumerate(commands):
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
            argv = argv[1:]
        commands[i] = (where, argv)
    return [(where, argv) for where, argv in commands if argv]


COMMANDS = documented_commands()


class _Parsed(BaseException):
    """Raised once the entry point's parser has parsed the documented arguments (BaseException, so no
    ``except Exception`` of the tool swallows it)."""

    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def _stop_after_parse(monkeypatch):
    for method in ("parse_args", "parse_intermixed_args"):
        original = getattr(argparse.ArgumentParser, method)

        def parse(self, args=None, namespace=None, _original=original):
            raise _Parsed(_original(self, args, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, method, parse)


def _check_repo_paths(where, argv):
    for token in argv:
        for part in token.split(","):
            if part.startswith(REPO_DIRS):
                assert glob.glob(os.path.join(REPO, part)), f"{where}: {part} does not exist in the repository"


def _check_namespace(where, namespace):
    config = getattr(namespace, "config_file", None)
    if not config:
        return
    assert os.path.isfile(os.path.join(REPO, config)), f"{where}: --config-file {config} does not exist"
    opts = getattr(namespace, "opts", None)
    if isinstance(opts, list):
        from panoptic_segformer.config import setup_cfg

        setup_cfg(os.path.join(REPO, config), opts)  # an unknown key or an odd count raises


def _parse_python_command(where, argv, monkeypatch):
    """Run ``python ARGV`` in-process until its parser has parsed ARGV; returns the namespace."""
    _stop_after_parse(monkeypatch)
    monkeypatch.chdir(REPO)
    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
        monkeypatch.setattr(sys, "argv", [module] + args)
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        script, args = argv[0], argv[1:]
        monkeypatch.setattr(sys, "argv", [script] + args)
        if not os.path.isfile(os.path.join(REPO, script)):
            # A script the docs ask users to write (docs/DATASETS.md's train_my_dataset.py): its block
            # parses with Detectron2's default_argument_parser, which is checked here.
            source = _user_script(script)
            assert "default_argument_parser().parse_args()" in source, f"{where}: {script} is neither in " \
                "the repository nor a Python block of the docs"
            from detectron2.engine import default_argument_parser

            run = lambda: default_argument_parser().parse_args(args)  # noqa: E731
        else:
            run = lambda: runpy.run_path(os.path.join(REPO, script), run_name="__main__")  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
        try:
            run()
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as e:
            pytest.fail(f"{where}: {' '.join(argv)} exited with {e.code} while parsing its arguments")
    pytest.fail(f"{where}: {' '.join(argv)} ran without parsing arguments")


def _user_script(name):
    for path in DOCS:
        for _, text in fenced_blocks(path, "python"):
            if text.startswith(f"# {name}\n"):
                return text
    return ""


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, argv, monkeypatch):
    _check_repo_paths(where, argv)
    program = argv[0]
    if program == "make":
        targets = [a for a in argv[1:] if "=" not in a]
        with open(os.path.join(REPO, "Makefile")) as f:
            makefile = f.read()
        for target in targets:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{where}: no make target {target!r}"
    elif program == "bash":
        script = os.path.join(REPO, argv[1])
        with open(script) as f:
            text = f.read()
        for option in (a for a in argv[2:] if a.startswith("--")):
            assert f"{option})" in text, f"{where}: {argv[1]} has no option {option}"
    elif program == "sbatch":  # sbatch [--opt=value ...] SCRIPT ARGS: a batch script of the project that passes
        script = next(a for a in argv[1:] if not a.startswith("-"))  # ARGS on to train_net.py
        with open(os.path.join(REPO, script)) as f:
            assert 'train_net.py "$@"' in f.read(), f"{where}: {script} does not pass its arguments to train_net.py"
        args = argv[argv.index(script) + 1:]
        _check_namespace(where, _parse_python_command(where, ["train_net.py", *args], monkeypatch))
    elif PYTHONS.search(program):
        if argv[1:3] == ["-m", "pytest"]:
            for target in (a for a in argv[3:] if not a.startswith("-")):
                assert os.path.exists(os.path.join(REPO, target)), f"{where}: {target} does not exist"
        elif argv[1:3] == ["-m", "panoptic_segformer.collect_env"]:
            from panoptic_segformer.collect_env import collect_env_info

            assert "detectron2" in collect_env_info()
        else:
            _check_namespace(where, _parse_python_command(where, argv[1:], monkeypatch))
    else:
        pytest.fail(f"{where}: unknown program {program!r}: document only commands of this project")


def test_every_documented_entry_point_is_run_by_a_test():
    """Entry points in RUN_BY are run by the named test: it must mention them."""
    documented = {a[2] if a[1] == "-m" else os.path.basename(a[1]) for _, a in COMMANDS
                  if PYTHONS.search(a[0]) and len(a) > 2}
    documented |= {os.path.basename(a[1]) for _, a in COMMANDS if a[0] == "bash"}
    for entry, test in RUN_BY.items():
        assert entry in documented, f"{entry} is no longer documented; update RUN_BY"
        with open(os.path.join(REPO, test)) as f:
            text = f.read()
        name = entry.rsplit(".", 1)[-1] if entry.startswith("projects.") else entry
        assert name.replace(".py", "").replace(".sh", "") in text, f"{test} does not run {entry}"


def test_plot_metrics_commands_run(tmp_path, monkeypatch):
    """The documented plot_metrics commands, on metrics.json files as Detectron2's JSONWriter writes them."""
    from projects.tools import plot_metrics

    commands = [argv for _, argv in COMMANDS if argv[1:3] == ["-m", "projects.tools.plot_metrics"]]
    assert commands
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        for path in (a for a in argv[3:] if a.endswith("metrics.json")):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                for it in range(0, 60, 20):
                    f.write(json.dumps({"iteration": it, "total_loss": 10.0 / (it + 1)}) + "\n")
                f.write(json.dumps({"iteration": 59, "panoptic_seg/PQ": 40.0, "panoptic_seg/PQ_th": 20.0,
                                    "panoptic_seg/PQ_st": 80.0}) + "\n")
        plot_metrics.main(argv[3:])
        out = argv[argv.index("-o") + 1]
        assert os.path.getsize(out) > 1000


def test_visualize_commands_run_on_tiny_settings(tmp_path):
    """The documented `projects.tools.visualize` commands, run with their own options and config
    overrides except: random weights instead of ``MODEL.WEIGHTS`` (not in the repository), 2 images of
    the tiny shapes set, a small test size and the thresholds at 0 (so that a random model keeps
    segments). Commands that differ only in these run once. Both pictures are written, named as
    documented, and stored small."""
    from PIL import Image

    from projects.tools import visualize

    documented = [argv[3:] for _, argv in COMMANDS if argv[1:3] == ["-m", "projects.tools.visualize"]]
    assert documented
    tiny = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256", "DATASETS.TRAIN", "()",
            "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "0.0",
            "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "0.0"]
    runs = {}
    for argv in documented:
        args = visualize.get_parser().parse_args(argv)
        assert args.config_file.startswith("configs/shapes/"), "document visualize with a shapes config " \
            "(its tiny dataset lets this test run it)"
        opts = [x for key, value in zip(args.opts[::2], args.opts[1::2]) if key != "MODEL.WEIGHTS"
                for x in (key, value)]
        key = (args.config_file, tuple(args.postprocessors), tuple(args.thresholds), tuple(opts))
        runs.setdefault(key, (args, opts))
    for i, (args, opts) in enumerate(runs.values()):
        out = str(tmp_path / str(i))
        paths = visualize.main(
            ["--postprocessors", *args.postprocessors, "--config-file", os.path.join(REPO, args.config_file),
             "--dataset", "shapes_panoptic_val_tiny", "--num-images", "2", "--attention-image",
             str(min(args.attention_image, 1)), "--output-dir", out, "--prefix", args.prefix]
            + [x for t in args.thresholds for x in ("--thresholds", t)] + opts + tiny)
        assert [os.path.basename(p) for p in paths] == [f"{args.prefix}predictions.png", f"{args.prefix}attention.png"]
        for path in paths:
            with Image.open(path) as image:
                assert image.size[0] > 200 and image.mode == "P"  # drawn, and stored with a palette
        with Image.open(paths[0]) as image:
            assert image.size[1] < image.size[0]  # 2 rows of 2 + len(postprocessors) panels


def test_python_blocks_compile_and_their_imports_resolve():
    for path in DOCS:
        for start, text in fenced_blocks(path, "python"):
            tree = ast.parse(text, filename=f"{path}:{start}")
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    if node.module == "train_net":
                        continue
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name), f"{path}:{start}: {node.module} has no {alias.name}"


def _slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path):
    with open(path, encoding="utf-8") as f:
        return {_slug(line.lstrip("#")) for line in f if re.match(r"^#{1,6} ", line)}


def test_links_and_pictures_exist():
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            assert os.path.exists(linked), f"{os.path.relpath(path, REPO)}: link to missing {target}"
            if anchor:
                assert anchor in _anchors(linked), \
                    f"{os.path.relpath(path, REPO)}: no heading #{anchor} in {file_part or 'itself'}"
            if linked.endswith(".png"):
                assert os.path.getsize(linked) < 300 * 1024, f"{target}: pictures are committed under 300 KB"


def test_readme_is_short_and_states_the_two_commands():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 200
    assert any(re.match(r"^!\[.*\]\(docs/.*\.png\)", line) for line in lines), "README shows no figure"
    commands = [argv for where, argv in COMMANDS if where.startswith("README.md")]
    assert ["make", "setup"] in commands and ["make", "test"] in commands
    with open(os.path.join(REPO, "docs", "BENCHMARKS.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 400


def test_docs_name_no_issue_or_work_pass():
    pattern = re.compile(r"\bissues? #?\d+|\b(first|second|third|fourth|fifth|\d+(st|nd|rd|th)) pass\b", re.I)
    for path in DOCS + glob.glob(os.path.join(REPO, "docs", "*")):
        if path.endswith((".md", ".json")):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    assert not pattern.search(line), f"{os.path.relpath(path, REPO)}:{lineno}: {line.strip()}"
    assert not [p for p in os.listdir(os.path.join(REPO, "docs")) if re.search(r"issue", p, re.I)]


def test_architecture_table_names_files_and_names_that_exist():
    with open(os.path.join(REPO, "docs", "ARCHITECTURE.md"), encoding="utf-8") as f:
        rows = [line.split("|")[1:-1] for line in f if line.startswith("| ") and "`" in line]
    assert len(rows) > 20
    for component, files, names in rows:
        paths = []
        for name in re.findall(r"`([^`]+)`", files):
            candidates = [os.path.join(REPO, "panoptic_segformer", name), os.path.join(REPO, name)]
            found = [c for c in candidates if os.path.exists(c)]
            assert found, f"ARCHITECTURE.md, {component.strip()}: {name} does not exist"
            paths.append(found[0])
        sources = ""
        for p in paths:
            files_of = sorted(glob.glob(os.path.join(p, "**", "*.py"), recursive=True)) if os.path.isdir(p) else [p]
            for source in files_of:
                with open(source, encoding="utf-8") as f:
                    sources += f.read()
        for name in re.findall(r"`([^`]+)`", names):
            assert re.search(rf"^\s*(def|class) {name}\b|^{name}\s*[:=]", sources, re.M), \
                f"ARCHITECTURE.md, {component.strip()}: {name} is not defined in {files.strip()}"


def test_code_points_to_docs_and_sections_that_exist():
    """A file of the repository that names ``docs/FILE`` (optionally with a quoted section, as in
    ``docs/INSTALL.md, "Portability"``) names a file and a heading (or a bold paragraph title) that exist,
    so renaming a picture or a section cannot leave a dangling pointer in a docstring, a test or a script."""
    reference = re.compile(r'docs/([\w.-]+\.(?:md|png|json))(?:,? \(?"([^"]+)")?')
    sources = [os.path.join(REPO, f) for f in ("train_net.py", "Makefile")]
    for folder in ("panoptic_segformer", "projects", "tests"):
        sources += glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True)
        sources += glob.glob(os.path.join(REPO, folder, "**", "*.sh"), recursive=True)
    checked = 0
    for source in sources:
        with open(source, encoding="utf-8") as f:
            text = f.read()
        for name, section in reference.findall(text):
            where = os.path.relpath(source, REPO)
            path = os.path.join(REPO, "docs", name)
            assert os.path.exists(path), f"{where}: docs/{name} does not exist"
            if section and name.endswith(".md"):
                section = " ".join(section.split())
                with open(path, encoding="utf-8") as f:
                    bold = {" ".join(b.split()) for b in re.findall(r"\*\*([^*]+)\*\*", f.read())}
                assert _slug(section) in _anchors(path) or section in bold, \
                    f"{where}: docs/{name} has no section (heading or bold paragraph title) {section!r}"
            checked += 1
    assert checked > 10

"""The docs agree with what runs: the commands of the READMEs, docs/*.md and the configs' header
comments parse as written from a fresh clone, their links resolve, the READMEs' result tables are
the committed results files, the argument table is the optimizer's signature, and the configs'
headers say what each config is, how to launch it and whether it has run."""

from __future__ import annotations

import ast
import inspect
import math
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

import compare  # noqa: E402
import sft  # noqa: E402

READMES = [ROOT / "README.md", RECIPES / "README.md"]
DOCS = [*READMES, *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_FILES = sorted((RECIPES / "configs").glob("*.yaml"))
RESULTS = sorted((RECIPES / "results").glob("*/results.md"))


def _code_lines(path: Path) -> list[str]:
    """Command lines of the file's ```bash blocks, continuation lines joined, comments dropped."""
    lines, block, pending = [], False, ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if not block:
            continue
        line = pending + raw.split(" #")[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line:
            lines.append(line)
    return lines


def _inline_commands(path: Path) -> list[str]:
    """Commands quoted inline (`...`) that run a recipe."""
    text = re.sub(r"```.*?```", " ", path.read_text(encoding="utf-8"), flags=re.DOTALL).replace("\n", " ")
    return [c for c in re.findall(r"`([^`]+)`", text) if re.search(r"recipes/(sft|compare)\.py", c) and " " in c]


def _header(text: str) -> list[str]:
    """The comment lines a YAML file starts with, without their '#'."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def _header_commands(text: str) -> list[str]:
    """The launch commands of a config's header comment (from '.venv/bin/' to the end of the line)."""
    return [line[line.index(".venv/bin/") :] for line in _header(text) if ".venv/bin/" in line]


COMMANDS = [(path.relative_to(ROOT).as_posix(), cmd) for path in DOCS for cmd in _code_lines(path)] + [
    (path.relative_to(ROOT).as_posix(), cmd) for path in CONFIG_FILES for cmd in _header_commands(path.read_text())
]
RECIPE_COMMANDS = [
    (where, cmd) for where, cmd in COMMANDS if re.search(r"recipes/(sft|compare|compare_plots)\.py", cmd)
] + [(p.relative_to(ROOT).as_posix(), c) for p in DOCS for c in _inline_commands(p) if ".venv/bin/" in c]


def test_the_docs_show_commands() -> None:
    assert len(RECIPE_COMMANDS) >= 8
    assert {where for where, _ in RECIPE_COMMANDS} >= {p.relative_to(ROOT).as_posix() for p in CONFIG_FILES}


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_commands_use_the_repositorys_venv(where: str, command: str) -> None:
    # From a fresh clone nothing is on PATH but bash and the system tools: python, accelerate,
    # pytest and ruff are the ones scripts/setup_env.sh installs into .venv.
    for part in command.split("&&"):
        words = [w for w in shlex.split(part) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
        tool = words[0] if words else ""
        assert tool not in ("python", "python3", "accelerate", "pytest", "ruff", "torchrun", "deepspeed"), (
            f"{where}: {command!r} needs .venv/bin/{tool}"
        )


def _script_argv(command: str) -> tuple[str, list[str], list[str]]:
    """(script, its arguments, accelerate's arguments) of a recipe command line."""
    words = [w for w in shlex.split(command) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    index = next(i for i, w in enumerate(words) if re.fullmatch(r"recipes/\w+\.py", w))
    return Path(words[index]).stem, words[index + 1 :], words[:index]


@pytest.mark.parametrize(("where", "command"), RECIPE_COMMANDS, ids=[f"{w}:{c[:70]}" for w, c in RECIPE_COMMANDS])
def test_recipe_commands_parse_as_written(where: str, command: str, tmp_path: Path) -> None:
    script, argv, launcher = _script_argv(command)
    argv = [a for a in argv if not a.startswith("<") and a != "..."]  # placeholders: <recipe.yaml>, ...
    if "--config_file" in launcher:
        path = launcher[launcher.index("--config_file") + 1]
        head, _, tail = path.partition("{")
        names, _, rest = tail.partition("}")
        for name in names.split(",") if tail else [""]:
            assert (ROOT / f"{head}{name}{rest}").is_file(), command
    if script == "compare_plots":
        assert all((ROOT / a / "results.json").is_file() for a in argv), command
        return
    if "--config" in argv and argv.index("--config") == len(argv) - 1:
        argv = argv[:-1]
    # GPU configs ask for bf16, which TrainingArguments accepts on a CPU only with use_cpu.
    extra = ["--output_dir", str(tmp_path), "--use_cpu", "true"]
    parsed = (sft if script == "sft" else compare).parse_args([*argv, *extra])
    if script == "compare":
        assert [compare.parse_variant(v) for v in parsed[0].variants]


def _tables(text: str) -> list[list[str]]:
    """The result tables of a markdown text (header starting '| optimizer | final train loss'), as rows."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("| optimizer | final train loss"):
            current = [line]
            tables.append(current)
        elif current is not None and line.startswith("|"):
            current.append(line)
        else:
            current = None
    return tables


def _committed_table(rows: list[str]) -> Path | None:
    for path in RESULTS:
        if _tables(path.read_text(encoding="utf-8")) == [rows]:
            return path
    return None


@pytest.mark.parametrize("doc", [ROOT / "README.md", RECIPES / "README.md"], ids=["README", "recipes/README"])
def test_every_result_table_in_the_readmes_is_a_committed_results_file(doc: Path) -> None:
    tables = _tables(doc.read_text(encoding="utf-8"))
    assert tables
    for rows in tables:
        assert _committed_table(rows) is not None, f"{doc.name}: table not found in {RESULTS}:\n" + "\n".join(rows)


def test_the_readmes_main_table_is_what_the_default_command_reproduces() -> None:
    import json

    import yaml

    section = (ROOT / "README.md").read_text(encoding="utf-8").split("### What the main job gives")[1]
    section = section.split("\n## ")[0]
    first = _tables(section)[0]
    results = json.loads((_committed_table(first).parent / "results.json").read_text())
    config = yaml.safe_load(compare.DEFAULT_CONFIG.read_text())
    assert results["compare_args"]["seeds"] == config["compare"]["seeds"]
    assert results["compare_args"]["variants"] == config["compare"]["variants"]
    assert results["training_args"]["max_steps"] == config["max_steps"]
    assert results["training_args"]["learning_rate"] == float(config["learning_rate"])
    # The multi-seed table is there too, and said to be one.
    assert len(_tables(section)) == 2 and "--seeds" in section


#: Words about how a text was made, not about the product.
MAKING_WORDS = re.compile(
    r"\bsession\b|\bissue \d+\b|\bthe issue's\b|\bthis VM\b|\bwas written\b|\bthat wrote it\b|\bgenerated by\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_docs_speak_of_the_product_not_of_its_making(doc: Path) -> None:
    name = doc.relative_to(ROOT).as_posix()
    found = MAKING_WORDS.findall(doc.read_text(encoding="utf-8"))
    assert not found, f"{name}: {found}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def broken_links(doc: Path) -> list[str]:
    """Relative links of a markdown file whose file, or heading anchor in a markdown file, is missing."""
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", " ", text, flags=re.DOTALL)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), flags=re.MULTILINE)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    return broken


@pytest.mark.parametrize("doc", [*DOCS, RECIPES / "paper" / "README.md"], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc: Path) -> None:
    assert not broken_links(doc)


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](there.md#a-heading) [gone](missing.md) [bad anchor](there.md#nope) [web](https://x.org)\n")
    assert broken_links(doc) == ["missing.md", "there.md#nope"]


def header_problems(path: Path) -> list[str]:
    """What a config's header comment fails to say: what the config is, its launch command (an
    existing script, this very config), whether it has run on a GPU (GPU configs); or history."""
    import yaml

    text = path.read_text(encoding="utf-8")
    header, commands = _header(text), _header_commands(text)
    problems = []
    if not header or len(header[0].split()) < 4:
        problems.append("the header does not start by saying what the config is")
    if not commands:
        problems.append("no launch command")
    config = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    for command in commands:
        script = re.search(r"recipes/\w+\.py", command)
        if script is None or not (ROOT / script.group()).is_file():
            problems.append(f"the command runs no existing recipe script: {command}")
        words = shlex.split(command)
        if "--config" not in words or words[words.index("--config") + 1] != config:
            problems.append(f"the command does not pass --config {config}: {command}")
    history = MAKING_WORDS.findall("\n".join(header)) + re.findall(r"parse-tested", "\n".join(header))
    if history:
        problems.append(f"the header tells how it was written: {history}")
    raw = yaml.safe_load(text) or {}
    if (raw.get("bf16") or "gpu" in path.name) and not re.search(
        r"not run on a GPU yet|\bran on\b", " ".join(header), re.IGNORECASE
    ):
        problems.append("a GPU config's header does not say whether it has run on a GPU")
    return problems


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_header_says_what_it_is_how_to_launch_it_and_whether_it_ran(path: Path) -> None:
    assert not header_problems(path)


def test_a_config_header_that_tells_its_history_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gpu_job.yaml"
    path.write_text(
        "# x\n# GPU recipe. Not run in the session that wrote it (no GPU there); parse-tested only.\n"
        "#   .venv/bin/python recipes/sft.py --config recipes/configs/other.yaml\nbf16: true\n"
    )
    problems = " | ".join(header_problems(path))
    for expected in ("what the config is", "does not pass --config", "how it was written", "whether it has run"):
        assert expected in problems


def _argument_defaults(text: str) -> dict[str, str]:
    """``name -> default`` cells of the README's argument table (``| `a`, `b` | 1, 2 | ... |`` rows split)."""
    rows = text.split("| argument | default | meaning |")[1].split("\n\n")[0].splitlines()[2:]
    out = {}
    for row in rows:
        names_cell, default_cell = (c.strip() for c in row.strip("|").split("|")[:2])
        names = re.findall(r"`(\w+)`", names_cell)
        defaults = (
            [d.strip().strip("`") for d in default_cell.split(",")] if len(names) > 1 else [default_cell.strip("`")]
        )
        out.update(zip(names, defaults))
    return out


def test_the_readmes_argument_table_is_the_optimizers_signature() -> None:
    from hf_to import TrainableOptimizer

    signature = inspect.signature(TrainableOptimizer.__init__).parameters
    expected = {k: p.default for k, p in signature.items() if k not in ("self", "params")}
    table = _argument_defaults((ROOT / "README.md").read_text(encoding="utf-8"))
    assert sorted(table) == sorted(expected), "one row per keyword"
    for name, cell in table.items():
        value = ast.literal_eval(cell)
        default = expected[name]
        if isinstance(default, float):  # a README "0" or "1e-3" is the float default
            same = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isclose(value, default)
        else:
            same = value == default and type(value) is type(default)
        assert same, f"{name}: README {cell}, code {default!r}"


def test_the_readme_documents_the_cache_and_the_relative_residual_above_one() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "HF_TO_CACHE" in text
    assert "above 1" in text and "worse than zero" in text


def test_the_readmes_give_one_run_time_for_the_default_job() -> None:
    config_text = compare.DEFAULT_CONFIG.read_text()
    minutes = re.findall(r"about (\d+) min", config_text)
    assert minutes, "the default config's header says how long the job takes"
    for text in ((ROOT / "README.md").read_text(), (RECIPES / "README.md").read_text(), compare.__doc__):
        assert not re.search(r"10-15 min|~10-15", text)
        assert f"about {minutes[0]} min" in text

"""Mutation testing of the science modules with mutmut: one isolated mutmut session per module.

``make mutate`` (or ``python tools/mutate.py [--modules losses,qformer] [--only GLOB]``) runs, for every selected
module of :data:`MODULES`, ``mutmut run`` in a scratch directory ``runs/mutation/<module>/`` that holds a copy of
``blip2lib/`` (decorated functions rewritten by :func:`undecorate`), a symlink to ``tests/``, a copy of
``pyproject.toml`` (pytest markers and ``addopts``) and a generated ``setup.cfg`` with that module's ``[mutmut]``
section. Why a scratch directory per module: mutmut reads its
configuration from the working directory only, and a per-module configuration is what restricts each mutant to the
module's own test files (a mutant of ``losses.py`` runs ``test_losses.py`` and ``test_tasks_reference.py``, never the
whole suite); within those files mutmut further runs only the tests that called the mutated function. ``runs/`` is
git-ignored and ruff-excluded, so the ``mutants/`` copies never reach the repository or the linter.

The summary (per module: mutants, killed, survived, equivalent, kill rate of the non-equivalent ones, time) goes to
stdout and to ``runs/mutation/summary.md``. Survivors listed in ``tools/mutation_equivalents.toml`` count as
equivalent when the mutated line still reads as recorded there (a renumbered or stale entry is reported, not
trusted); entries of kind ``accepted`` are known, explained survivors and still count against the kill rate.
Exit status 1 when the kill rate of a module falls below ``--min-kill-rate`` (default 90 %).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "runs" / "mutation"
EQUIVALENTS = ROOT / "tools" / "mutation_equivalents.toml"

# mutmut's exit-code convention (mutmut.stats.status_by_exit_code): 1 / 3 = a test failed, 0 = all passed.
KILLED_CODES = {1, 3}
TIMEOUT_CODES = {36, -24, 24, 152, 255}  # a mutant that hangs the tests counts as killed (as mutmut scores it)


@dataclass(frozen=True)
class Module:
    """One science module: the file mutmut mutates, the test files that may kill its mutants, and the pass."""

    source: str  # path relative to the repository root
    tests: tuple[str, ...]  # test files (never the whole suite)
    names: tuple[str, ...] = ()  # mutant-name globs to run; empty = every mutant of the file
    measured: bool = True  # False: waits for the second pass (the module is being changed now)


# Test files per module: the module's own unit tests plus the reference tests that pin its numbers end to end.
# Multi-process (`dist`) tests are left out: mutmut forks one child per mutant and the gloo workers would re-spawn.
MODULES: dict[str, Module] = {
    "losses": Module(
        "blip2lib/losses.py",
        ("tests/unit/test_losses.py", "tests/unit/test_tasks_reference.py", "tests/unit/test_mutation_kills_losses.py"),
    ),
    "tasks": Module(
        "blip2lib/tasks.py",
        (
            "tests/unit/test_tasks_reference.py",
            "tests/unit/test_featcache.py",
            "tests/unit/test_tasks_llm_inputs.py",
            "tests/unit/test_train_fidelity.py",
            "tests/unit/test_model.py",
            "tests/unit/test_mutation_kills_tasks.py",
            "tests/unit/test_mutation_kills_tasks_stage2.py",
        ),
    ),
    "qformer": Module(
        "blip2lib/qformer*.py",  # qformer.py and qformer_init.py (init_weights, the BERT loader)
        (
            "tests/unit/test_qformer.py",
            "tests/unit/test_tasks_reference.py",
            "tests/unit/test_mutation_kills_qformer.py",
        ),
    ),
    "checkpoint": Module(
        "blip2lib/checkpoint.py", ("tests/unit/test_checkpoint.py", "tests/unit/test_mutation_kills_checkpoint.py")
    ),
    # Second pass.
    "decoding": Module(
        "blip2lib/decoding.py",
        ("tests/unit/test_decoding.py", "tests/unit/test_model.py", "tests/unit/test_mutation_kills_decoding.py"),
    ),
    "generation": Module(
        "blip2lib/generation.py",
        (
            "tests/unit/test_generation_lengths.py",
            "tests/unit/test_llm.py",
            "tests/unit/test_parity.py",
            "tests/unit/test_mutation_kills_generation.py",
        ),
    ),
    "optim": Module(
        "blip2lib/optim.py",
        (
            "tests/unit/test_optim.py",
            "tests/unit/test_engine.py",
            "tests/unit/test_checkpoint.py",
            "tests/unit/test_train_fidelity.py",
            "tests/unit/test_mutation_kills_optim.py",
        ),
    ),
    "engine": Module(
        "blip2lib/engine.py",
        (
            "tests/unit/test_engine.py",
            "tests/unit/test_train_fidelity.py",
            "tests/unit/test_mutation_kills_engine.py",
        ),
    ),
    # evaluate/ is the largest (about 2800 mutants): `ONLY='blip2lib.evaluate.vqa.*'` measures one file of it.
    "evaluate": Module(
        "blip2lib/evaluate/*.py",
        (
            "tests/unit/test_eval_caption.py",
            "tests/unit/test_eval_vqa.py",
            "tests/unit/test_eval_retrieval.py",
            "tests/unit/test_eval_drivers.py",
            "tests/unit/test_generation_lengths.py",
            "tests/unit/test_mutation_kills_evaluate.py",
            "tests/unit/test_mutation_kills_evaluate_common.py",
            "tests/unit/test_mutation_kills_evaluate_main.py",
            "tests/unit/test_mutation_kills_evaluate_drivers.py",
            "tests/unit/test_mutation_kills_evaluate_caption.py",
            "tests/unit/test_mutation_kills_evaluate_retrieval.py",
        ),
    ),
}


@dataclass
class Result:
    """Counts of one module's mutmut session (only the mutants its name globs select)."""

    name: str
    seconds: float
    killed: int = 0
    timeout: int = 0
    survived: list[str] = field(default_factory=list)  # survived, no tests, or suspicious
    equivalent: dict[str, str] = field(default_factory=dict)  # mutant -> reason
    accepted: dict[str, str] = field(default_factory=dict)  # known survivors, not equivalent: counted as survivors
    stale: list[str] = field(default_factory=list)  # equivalence entries whose recorded line no longer matches
    diffs: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Every selected mutant that mutmut checked."""
        return self.killed + self.timeout + len(self.survived) + len(self.equivalent)

    @property
    def kill_rate(self) -> float:
        """(killed + timeout) / non-equivalent mutants; 1.0 when there is none."""
        non_equivalent = self.total - len(self.equivalent)
        return (self.killed + self.timeout) / non_equivalent if non_equivalent else 1.0


def write_setup_cfg(work: Path, mod: Module) -> None:
    """The module's ``[mutmut]`` section: copy all of blip2lib (imports), mutate one file, run its tests only."""
    lines = [
        "[mutmut]",
        "source_paths=blip2lib",
        f"only_mutate={mod.source}",
        "pytest_add_cli_args_test_selection=",
        *(f"    {t}" for t in mod.tests),
        "pytest_add_cli_args=",
        "    -p",
        "    no:cacheprovider",
        "use_git_change_detection=false",
    ]
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")


def undecorate(source: str) -> str:
    """Apply the decorators of top-level functions after their definition, so that mutmut mutates them too.

    mutmut 3 skips every decorated function (``@torch.no_grad()`` on ``beam_search``, ``generate_ids``, the
    retrieval scorer, ...). ``@d1 @d2 def f`` and ``def f`` followed by ``f = d1(d2(f))`` define the same ``f``, so
    the scratch copy gets the second form. Line numbers are kept: each decorator line becomes a comment and the
    assignment takes the blank line after the function (a new line only when there is none).
    """
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.decorator_list]
    for fn in reversed(funcs):  # bottom-up, so the earlier line numbers stay valid
        decorators = [ast.get_source_segment(source, d) for d in fn.decorator_list]
        wrapped = fn.name
        for dec in reversed(decorators):
            wrapped = f"({dec})({wrapped})"
        end = fn.end_lineno  # 1-based last line of the body = index of the line after it
        if end < len(lines) and not lines[end].strip():
            lines[end] = f"{fn.name} = {wrapped}\n"
        else:
            lines.insert(end, f"{fn.name} = {wrapped}\n")
        first = fn.decorator_list[0].lineno - 1
        for i in range(first, fn.lineno - 1):  # fn.lineno is the `def` line (after the decorators)
            lines[i] = "# decorator applied after the function (tools/mutate.py: undecorate)\n"
    return "".join(lines)


def prepare(name: str, mod: Module) -> Path:
    """A fresh scratch directory for one module (no stale mutants from an earlier version of the source)."""
    work = SCRATCH / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # blip2lib is copied (its mutated files are rewritten below), tests are linked
    shutil.copytree(ROOT / "blip2lib", work / "blip2lib", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "tests").symlink_to(ROOT / "tests", target_is_directory=True)
    for path in sorted(work.glob(mod.source)):
        path.write_text(undecorate(path.read_text()))
    shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
    write_setup_cfg(work, mod)
    return work


def mutant_diff(work: Path, mutant: str, env: dict[str, str]) -> str:
    """The ``-``/``+`` lines of ``mutmut show`` for one mutant."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", mutant], cwd=work, env=env, capture_output=True, text=True
    ).stdout
    return "\n".join(ln for ln in out.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---"))


def load_equivalents() -> dict[str, dict[str, str]]:
    """``{mutant: {"change": mutated line fragment, "reason": why no test can tell it apart}}``."""
    if not EQUIVALENTS.exists():
        return {}
    data = tomllib.loads(EQUIVALENTS.read_text())
    return {e["mutant"]: e for e in data.get("equivalent", [])}


def run_module(name: str, mod: Module, only: list[str], equivalents: dict[str, dict[str, str]]) -> Result:
    """Run mutmut for one module (one worker) and classify every selected mutant."""
    work = prepare(name, mod)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the mutated copy must be the one imported
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    names = list(only or mod.names)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mutmut", "run", "--max-children", "1", *names],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,  # a spinner per mutant; the counts come from the meta files below
        stderr=subprocess.PIPE,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mutmut failed for {name} ({mod.source}):\n{proc.stderr[-3000:]}")
    res = Result(name, seconds)
    for meta in sorted((work / "mutants").glob(mod.source + ".meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        for mutant, code in sorted(codes.items()):
            if names and not any(fnmatch.fnmatch(mutant, g) for g in names):
                continue
            if code is None:  # not selected by the name globs of this run
                continue
            if code in KILLED_CODES:
                res.killed += 1
            elif code in TIMEOUT_CODES:
                res.timeout += 1
            else:
                diff = mutant_diff(work, mutant, env)
                res.diffs[mutant] = diff
                entry = equivalents.get(mutant)
                added = "\n".join(ln for ln in diff.splitlines() if ln.startswith("+"))
                if entry and entry["change"] in added and entry.get("kind", "equivalent") != "accepted":
                    res.equivalent[mutant] = f"{entry.get('kind', 'equivalent')}: {entry['reason']}"
                else:
                    res.survived.append(mutant)
                    if entry and entry["change"] not in added:
                        res.stale.append(mutant)
                    elif entry:
                        res.accepted[mutant] = entry["reason"]
    return res


def report(results: list[Result]) -> str:
    """Markdown summary: the per-module table, then every survivor with its diff."""
    rows = [
        "| module | mutants | killed | timeout | survived | equivalent | kill rate (non-equiv.) | time (s) | /min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rate = 60 * r.total / r.seconds if r.seconds else 0.0
        rows.append(
            f"| {r.name} | {r.total} | {r.killed} | {r.timeout} | {len(r.survived)} | {len(r.equivalent)} "
            f"| {100 * r.kill_rate:.1f} % | {r.seconds:.0f} | {rate:.0f} |"
        )
    lines = rows
    for r in results:
        for mutant in r.survived:
            note = " (equivalence entry is stale: re-check it)" if mutant in r.stale else ""
            note = f" (known: {r.accepted[mutant]})" if mutant in r.accepted else note
            lines += ["", f"SURVIVED {mutant}{note}", "```diff", r.diffs[mutant], "```"]
    for r in results:
        lines += ["", f"Equivalent in {r.name}:", *(f"- {m}: {why}" for m, why in sorted(r.equivalent.items()))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse the module selection, run each module, print and save the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", default="", help="comma/space separated names (default: the measured ones)")
    ap.add_argument("--only", default="", help="comma separated mutant-name globs (overrides a module's own)")
    ap.add_argument("--min-kill-rate", type=float, default=0.90)
    args = ap.parse_args(argv)
    chosen = args.modules.replace(",", " ").split() or [n for n, m in MODULES.items() if m.measured]
    unknown = [n for n in chosen if n not in MODULES]
    if unknown:
        raise SystemExit(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}")
    equivalents = load_equivalents()
    only = [g for g in args.only.split(",") if g]
    results = []
    for name in chosen:
        print(f"==> mutmut: {name} ({MODULES[name].source}; tests: {' '.join(MODULES[name].tests)})", flush=True)
        results.append(run_module(name, MODULES[name], only, equivalents))
        print(f"    {results[-1].total} mutants in {results[-1].seconds:.0f} s", flush=True)
    text = report(results)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    (SCRATCH / "summary.md").write_text(text)
    print(text)
    low = [r.name for r in results if r.kill_rate < args.min_kill_rate]
    if low:
        print(f"kill rate below {100 * args.min_kill_rate:.0f} % in: {', '.join(low)}")
    return 1 if low else 0


if __name__ == "__main__":
    raise SystemExit(main())

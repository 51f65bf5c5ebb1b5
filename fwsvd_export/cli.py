"""Command line: a thin layer over the pipeline.

Exit codes: 0 passed, 1 validation failed, 2 bad input (recipe, data, model, output path), 3 the tool
could not finish (a bug, or the machine: disk full, out of memory), 128 + N killed by signal N (130
for Ctrl-C, 143 for SIGTERM). SIGTERM, SIGHUP (the terminal closed) and SIGQUIT are handled like Ctrl-C: staged
output is removed on the way out. Nothing heavy is imported at module level, so that a Ctrl-C while the
libraries load reaches a command's handler (one line, exit 130), not Python's traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from .errors import FwsvdError

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CRASH, EXIT_SIGNAL = 1, 2, 3, 128
# handled like Ctrl-C: closing the terminal sends SIGHUP, Ctrl-\ sends SIGQUIT
_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name))
_MACHINE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM, errno.EROFS}


class Interrupted(KeyboardInterrupt):
    """A termination signal, raised where the program is so that every cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _redelivering(previous: Callable[[sys.UnraisableHookArgs], object]) -> Callable[[sys.UnraisableHookArgs], None]:
    """An unraisable-exception hook that sends a swallowed signal again. A handler's exception raised while
    Python runs a finalizer or a weakref callback is only printed ("Exception ignored in ...") and the run would
    go on; resent from a short timer thread, it lands in ordinary code instead of in this hook."""

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, KeyboardInterrupt):
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        previous(unraisable)

    return hook


@contextlib.contextmanager
def _termination_as_interrupt() -> Iterator[None]:
    """Meanwhile, each terminating signal raises `Interrupted`, so staged output is removed as for Ctrl-C. A
    signal the caller ignores stays ignored (``nohup`` starts the command with SIGHUP ignored so that it
    outlives the terminal). The handlers found are put back on exit (`main` holds this for one command)."""
    found = {signum: signal.getsignal(signum) for signum in _TERMINATING}
    for signum, handler in found.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _raise_interrupted)
    unraisable, sys.unraisablehook = sys.unraisablehook, _redelivering(sys.unraisablehook)
    try:
        yield
    finally:
        sys.unraisablehook = unraisable
        for signum, handler in found.items():  # None: a handler set outside Python, not restorable from here
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


class _TaskChoice(click.Choice):
    """The registry's task names, read when the option is parsed or the help shown: the registry imports
    torch and transformers (seconds), which would otherwise load before any command's handler is in place."""

    def __init__(self) -> None:  # no names yet: `choices` reads them on use
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        from .stages.tasks import TASKS

        return tuple(TASKS)


def _out_of_room(exc: BaseException) -> bool:
    """A full disk or memory, from Python (OSError, MemoryError) or from a Rust library such as
    safetensors or tokenizers (a plain Exception whose message ends in "(os error N)")."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _MACHINE
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return found is not None and int(found.group(1)) in _MACHINE


def _fail(exc: FwsvdError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _forget_native_interrupt() -> None:
    """CPython ends the process by SIGINT at exit, whatever `sys.exit` asked, when a KeyboardInterrupt last
    escaped code it ran for a native caller (``PyRun_*``): a Ctrl-C that landed there exited -2, not 130 (and
    would end by SIGINT a run that went on after a library swallowed it). Running an empty string the same
    way clears that flag; `guarded` does so however a command ends."""
    try:
        ctypes.pythonapi.PyRun_SimpleString(b"")
    except AttributeError:  # not CPython
        pass


def guarded(command: Callable) -> Callable:
    """Map every way a command can end onto the exit codes above, with a message naming the cause."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FwsvdError as exc:
            _fail(exc)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt as exc:
            signum, done = getattr(exc, "signum", signal.SIGINT), getattr(exc, "output_in_place", None)
            click.echo(
                f"interrupted ({signal.Signals(signum).name}): "
                + (
                    f"just after the results were moved into place: {done} is complete"
                    if done
                    else "no output was written, earlier outputs are untouched"
                ),
                err=True,
            )
            sys.exit(EXIT_SIGNAL + signum)
        except Exception as exc:
            if _out_of_room(exc):
                click.echo(f"error: the machine ran out of room: {exc}; no output was written", err=True)
                sys.exit(EXIT_CRASH)
            traceback.print_exc()
            click.echo(
                "error: fwsvd-export crashed (a bug, not your input); no output was written. Please report "
                "it with the traceback above.",
                err=True,
            )
            sys.exit(EXIT_CRASH)
        finally:
            _forget_native_interrupt()

    return wrapper


@click.group()
@click.version_option(package_name="fwsvd-export")
def main() -> None:
    """Compress a transformer's Linear layers with Fisher-weighted SVD, export ONNX, validate in ONNX Runtime."""
    from .stages.library_log import log_to_console

    command = click.get_current_context()  # closed when the command ends, however it ends: each setting put back
    command.with_resource(_termination_as_interrupt())
    command.with_resource(log_to_console())


@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Output folder (default: export.output)."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one recipe key, e.g. compression.ratio=0.4.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@guarded
def run_command(recipe: Path, output: Path | None, overrides: tuple[str, ...], quiet: bool) -> None:
    """Run every stage of RECIPE: compress, checkpoint, export, validate, report."""
    from .loader import load_recipe
    from .pipeline import run

    loaded = load_recipe(recipe, overrides)
    if _lent(loaded):
        return
    result = run(loaded, output, progress=not quiet)
    summary = result.report.compression.summary()
    click.echo(
        f"{'PASSED' if result.passed else 'FAILED'}: {summary['compressed_layers']} layers factorized with "
        f"{summary['method']}, {summary['targeted_kept_ratio']:.1%} of targeted parameters kept"
    )
    for check in result.report.validation.checks:
        click.echo(f"  [{'ok' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
    for note in result.report.output_notes or []:
        click.echo(f"  note: {note}")
    click.echo(f"report: {result.output / 'report.md'}")
    sys.exit(0 if result.passed else EXIT_FAILED)


def _lent(recipe) -> bool:
    """Under torchrun with several processes: ranks other than 0 lend their share of the statistics
    pass and of the factorization, then stop (True); rank 0 goes on to do the whole run. The process group
    is held for the rest of the command (`distributed.joined`) and left when it ends, however it ends."""
    from .core import distributed
    from .pipeline import lend_compute

    if not click.get_current_context().with_resource(distributed.joined()) or distributed.world()[0] == 0:
        return False
    lend_compute(recipe)
    return True


@main.command("compress")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="Checkpoint folder."
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one recipe key.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@guarded
def compress_command(recipe: Path, output: Path, overrides: tuple[str, ...], quiet: bool) -> None:
    """Only the compress stage of RECIPE: write a checkpoint that `fwsvd_export.load` rebuilds."""
    from .loader import load_recipe
    from .pipeline import compress_only

    loaded = load_recipe(recipe, overrides)
    if _lent(loaded):
        return
    folder, compression = compress_only(loaded, output, progress=not quiet)
    summary = compression["summary"]
    click.echo(
        f"{summary['compressed_layers']} layers factorized with {summary['method']}, "
        f"{summary['targeted_kept_ratio']:.1%} of targeted parameters kept: {folder}"
    )


@main.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="ONNX folder.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's recommended one).")
@click.option("--no-past", is_flag=True, help="Decoders: export without the key/value cache.")
@guarded
def export_command(checkpoint: Path, output: Path, opset: int | None, no_past: bool) -> None:
    """Export a compressed CHECKPOINT to ONNX and check that each factorized layer is two MatMuls."""
    from .stages.checkpoint import load, read_manifest
    from .stages.export import export_onnx, inspect_graph
    from .stages.outputs import staged_output
    from .stages.tasks import get_task

    task = read_manifest(checkpoint)["task"]
    with staged_output(output, inputs=[checkpoint]) as staged:
        model, tokenizer = load(checkpoint, with_tokenizer=True)
        path = export_onnx(model, tokenizer, staged.path, get_task(task).onnx_task(not no_past), opset)
        graph = inspect_graph(path, model)
    click.echo(
        f"{output / path.name}: {graph['split_matmul_pairs_found']} of {graph['factorized_layers']} factorized "
        f"layers are two matrix multiplies ({graph['matmul_nodes']} MatMul, {graph['gemm_nodes']} Gemm nodes)"
    )
    if graph["layers_missing_split"]:
        sys.exit(EXIT_FAILED)


def _floats(text: str, name: str) -> list[float]:
    """The numbers of a sweep option: at least one (an empty list would silently fall back to a default),
    each once (`_once`)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None
    if not values:
        raise click.BadParameter(f"expected comma-separated numbers, got none ({text!r})", param_hint=name)
    _once([f"{v:g}" for v in values], name)  # as the point folders name them
    return values


def _once(items: list[str], name: str) -> None:
    """Refuse a sweep option that gives a value twice, before any work: the point would run twice, the
    second time into the first one's folder."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise click.BadParameter(f"{item} is given twice; each point runs once", param_hint=name)
        seen.add(item)


@main.command("sweep")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ratios", default="0.9,0.7,0.5,0.3", show_default=True, help="Kept-parameter ratios, one run each.")
@click.option("--budgets", default=None, help="Global-allocation budgets instead of uniform ratios.")
@click.option("--methods", default=None, help="Comma-separated methods (default: the recipe's).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Sweep folder.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one recipe key.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@guarded
def sweep_command(
    recipe: Path,
    ratios: str,
    budgets: str | None,
    methods: str | None,
    output: Path | None,
    overrides: tuple[str, ...],
    quiet: bool,
) -> None:
    """Run RECIPE at several ratios (or budgets) and methods; write a table and plots of the frontier."""
    from .loader import load_recipe
    from .sweep import sweep

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FwsvdError(
            "sweep runs in one process (it already gathers the statistics once for every point); "
            "launch it without torchrun"
        )

    values = _floats(budgets, "--budgets") if budgets is not None else _floats(ratios, "--ratios")
    names = [m.strip() for m in methods.split(",")] if methods else [load_recipe(recipe, overrides).compression.method]
    _once(names, "--methods")
    folder, points, plots = sweep(
        recipe, values, names, output, overrides, budget=budgets is not None, progress=not quiet
    )
    click.echo((folder / "sweep.md").read_text())
    for path in plots:
        click.echo(f"plot: {path}")
    if not plots:
        click.echo("plots skipped: pip install matplotlib")
    failed = [f"{p['method']} {p.get('ratio', p.get('budget'))}" for p in points if not p["passed"]]
    if failed:
        click.echo(f"validation failed at: {', '.join(failed)}")
        sys.exit(EXIT_FAILED)


@main.command("inspect")
@click.argument("model")
@click.option("--task", default="feature-extraction", show_default=True, type=_TaskChoice())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guarded
def inspect_command(model: str, task: str, as_json: bool) -> None:
    """List MODEL's Linear layers (a folder, hub id, or checkpoint), their shapes and break-even ranks."""
    from .core.lowrank import LowRankLinear, break_even_rank, linear_weight
    from .core.modules import linear_layers
    from .stages.checkpoint import MANIFEST, load
    from .stages.models import load_pretrained

    loaded = load(model) if (Path(model) / MANIFEST).is_file() else load_pretrained(model, task)[0]
    rows = []
    for name, m in loaded.named_modules():
        if isinstance(m, LowRankLinear):
            rows.append(
                {
                    "name": name,
                    "in": m.in_features,
                    "out": m.out_features,
                    "rank": m.rank,
                    "break_even_rank": break_even_rank(m.in_features, m.out_features),
                }
            )
    for name, m in linear_layers(loaded).items():
        if not any(name.startswith(r["name"] + ".") for r in rows):
            out_f, in_f = linear_weight(m).shape
            rows.append(
                {"name": name, "in": in_f, "out": out_f, "rank": None, "break_even_rank": break_even_rank(in_f, out_f)}
            )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'layer':<{width}}  {'in':>6} {'out':>6} {'rank':>6} {'break-even':>10}")
    for r in rows:
        click.echo(
            f"{r['name']:<{width}}  {r['in']:>6} {r['out']:>6} {r['rank'] or 'dense':>6} {r['break_even_rank']:>10.1f}"
        )


@main.command("methods")
@guarded
def methods_command() -> None:
    """List the compression methods and the calibration statistics each needs."""
    from .core.methods import METHODS

    for m in METHODS.values():
        click.echo(f"{m.name:<8} {m.summary} (statistics: {', '.join(sorted(m.needs)) or 'none'})")


@main.command("check")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder the run would use (default: export.output).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one recipe key, as for run.")
@click.option("--json", "as_json", is_flag=True, help="The plan as JSON.")
@guarded
def check_command(recipe: Path, output: Path | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check RECIPE as `run` would, without running it: the recipe, the data files (read and tokenized), the
    model's config against its weights' headers (no weight loaded) and the output folder; print the plan.
    Writes nothing. Exit 0, or 2 with the error run would give."""
    from .loader import load_recipe
    from .plan import check_recipe, describe, plan_json

    plan = check_recipe(load_recipe(recipe, overrides), output)
    click.echo(plan_json(plan) if as_json else "\n".join(describe(plan)))


@main.command("schema")
@guarded
def schema_command() -> None:
    """Print the recipe's JSON Schema (draft 2020-12), for an editor: save it and start a recipe with
    `# yaml-language-server: $schema=recipe.schema.json`."""
    from .recipe_schema import recipe_schema

    click.echo(json.dumps(recipe_schema(), indent=2))


@main.command("init")
@click.option("--model", "model", required=True, help="A local model folder or a hub id.")
@click.option("--task", required=True, type=_TaskChoice())
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A JSONL/CSV/TSV/text file; its columns are guessed.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("recipe.yaml"),
    show_default=True,
    help="The recipe file to write (never overwritten).",
)
@guarded
def init_command(model: str, task: str, data: Path | None, output: Path) -> None:
    """Write a commented starter recipe for MODEL and TASK that `fwsvd-export check` accepts."""
    from .starter import write_starter

    notes = write_starter(output, model, task, data)
    click.echo(f"wrote {output}")
    for note in notes:
        click.echo(f"  note: {note}")
    click.echo(f"next: fwsvd-export check {output}")


@main.command("lm-eval")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--tasks", required=True, help="Comma-separated lm-eval task names, e.g. arc_easy,piqa,wikitext.")
@click.option("--include-path", type=click.Path(path_type=Path), help="A folder of your own lm-eval task YAMLs.")
@click.option("--limit", type=click.IntRange(min=1), help="Score at most N items of each task (a quick look).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Rows per graph run.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Examples before each item (default: the task's).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write lm-eval's results as JSON.")
@guarded
def lm_eval_command(
    folder: Path,
    tasks: str,
    include_path: Path | None,
    limit: int | None,
    batch_size: int,
    provider: str,
    num_fewshot: int | None,
    output: Path | None,
) -> None:
    """Score FOLDER with lm-evaluation-harness on TASKS, in ONNX Runtime: a run's output folder (the graph its
    report recommends) or an exported text-generation graph folder. Needs pip install 'fwsvd-export[lm-eval]'."""
    from .stages.harness import evaluate, write_results

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    result = evaluate(folder, names, include_path, limit, batch_size, provider, num_fewshot)
    click.echo(f"scored {result.graph}: {result.why}")
    click.echo(result.table)
    if output is not None:
        write_results(result.results, output)
        click.echo(f"results: {output}")


if __name__ == "__main__":
    main()

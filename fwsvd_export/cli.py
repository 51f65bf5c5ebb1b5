"""Command line: a thin layer over the pipeline. Exit codes: 0 passed, 1 validation failed, 2 bad input."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import FwsvdError

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def _fail(exc: FwsvdError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(EXIT_BAD_INPUT)


@click.group()
@click.version_option(package_name="fwsvd-export")
def main() -> None:
    """Compress a transformer's Linear layers with Fisher-weighted SVD, export ONNX, validate in ONNX Runtime."""


@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Output folder (default: export.output).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one recipe key, e.g. compression.ratio=0.4.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_command(recipe: Path, output: Path | None, overrides: tuple[str, ...], quiet: bool) -> None:
    """Run every stage of RECIPE: compress, checkpoint, export, validate, report."""
    from .pipeline import run
    from .recipe import load_recipe

    try:
        result = run(load_recipe(recipe, overrides), output, progress=not quiet)
    except FwsvdError as exc:
        _fail(exc)
    summary = result.report["compression"]["summary"]
    click.echo(f"{'PASSED' if result.passed else 'FAILED'}: {summary['compressed_layers']} layers factorized with "
               f"{summary['method']}, {summary['targeted_kept_ratio']:.1%} of targeted parameters kept")
    for check in result.report["validation"]["checks"]:
        click.echo(f"  [{'ok' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
    click.echo(f"report: {result.output / 'report.md'}")
    sys.exit(0 if result.passed else EXIT_FAILED)


@main.command("compress")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="Checkpoint folder.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one recipe key.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compress_command(recipe: Path, output: Path, overrides: tuple[str, ...], quiet: bool) -> None:
    """Only the compress stage of RECIPE: write a checkpoint that `fwsvd_export.load` rebuilds."""
    from .pipeline import compress_only
    from .recipe import load_recipe

    try:
        folder, compression = compress_only(load_recipe(recipe, overrides), output, progress=not quiet)
    except FwsvdError as exc:
        _fail(exc)
    summary = compression["summary"]
    click.echo(f"{summary['compressed_layers']} layers factorized with {summary['method']}, "
               f"{summary['targeted_kept_ratio']:.1%} of targeted parameters kept: {folder}")


@main.command("export")
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="ONNX folder.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's recommended one).")
@click.option("--no-past", is_flag=True, help="Decoders: export without the key/value cache.")
def export_command(checkpoint: Path, output: Path, opset: int | None, no_past: bool) -> None:
    """Export a compressed CHECKPOINT to ONNX and check that each factorized layer is two MatMuls."""
    from .checkpoint import load, read_manifest
    from .export import export_onnx, inspect_graph
    from .pipeline import staged

    try:
        task = read_manifest(checkpoint)["task"]
        model, tokenizer = load(checkpoint, with_tokenizer=True)
    except FwsvdError as exc:
        _fail(exc)
    if output.exists() and any(output.iterdir()):
        _fail(FwsvdError(f"output folder {output} is not empty"))
    onnx_task = task + ("-with-past" if task == "text-generation" and not no_past else "")
    with staged(output) as stage:
        path = export_onnx(model, tokenizer, stage, onnx_task, opset)
        graph = inspect_graph(path, model)
    click.echo(f"{output / path.name}: {graph['split_matmul_pairs_found']} of {graph['factorized_layers']} factorized "
               f"layers are two matrix multiplies ({graph['matmul_nodes']} MatMul, {graph['gemm_nodes']} Gemm nodes)")
    if graph["layers_missing_split"]:
        sys.exit(EXIT_FAILED)


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None


@main.command("sweep")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ratios", default="0.9,0.7,0.5,0.3", show_default=True, help="Kept-parameter ratios, one run each.")
@click.option("--budgets", default=None, help="Global-allocation budgets instead of uniform ratios.")
@click.option("--methods", default=None, help="Comma-separated methods (default: the recipe's).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Sweep folder.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one recipe key.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def sweep_command(recipe: Path, ratios: str, budgets: str | None, methods: str | None, output: Path | None,
                  overrides: tuple[str, ...], quiet: bool) -> None:
    """Run RECIPE at several ratios (or budgets) and methods; write a table and plots of the frontier."""
    from .recipe import load_recipe
    from .sweep import plot, sweep

    values = _floats(budgets, "--budgets") if budgets else _floats(ratios, "--ratios")
    try:
        names = [m.strip() for m in methods.split(",")] if methods else [load_recipe(recipe, overrides).compression.method]
        folder, points = sweep(recipe, values, names, output, overrides, budget=budgets is not None, progress=not quiet)
    except FwsvdError as exc:
        _fail(exc)
    click.echo((folder / "sweep.md").read_text())
    try:
        for path in plot(points, folder):
            click.echo(f"plot: {path}")
    except ImportError:
        click.echo("plots skipped: pip install matplotlib")
    failed = [f"{p['method']} {p.get('ratio', p.get('budget'))}" for p in points if not p["passed"]]
    if failed:
        click.echo(f"validation failed at: {', '.join(failed)}")
        sys.exit(EXIT_FAILED)


@main.command("inspect")
@click.argument("model")
@click.option("--task", default="feature-extraction", show_default=True,
              type=click.Choice(["text-classification", "feature-extraction", "text-generation"]))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_command(model: str, task: str, as_json: bool) -> None:
    """List MODEL's Linear layers (a folder, hub id, or checkpoint), their shapes and break-even ranks."""
    from .compress import linear_layers
    from .factorize import LowRankLinear, break_even_rank, linear_weight
    from .models import load_pretrained
    from .checkpoint import MANIFEST, load

    try:
        if (Path(model) / MANIFEST).is_file():
            loaded = load(model)
        else:
            loaded = load_pretrained(model, task)[0]
    except FwsvdError as exc:
        _fail(exc)
    rows = []
    for name, m in loaded.named_modules():
        if isinstance(m, LowRankLinear):
            rows.append({"name": name, "in": m.in_features, "out": m.out_features, "rank": m.rank,
                         "break_even_rank": break_even_rank(m.in_features, m.out_features)})
    for name, m in linear_layers(loaded).items():
        if not any(name.startswith(r["name"] + ".") for r in rows):
            out_f, in_f = linear_weight(m).shape
            rows.append({"name": name, "in": in_f, "out": out_f, "rank": None, "break_even_rank": break_even_rank(in_f, out_f)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'layer':<{width}}  {'in':>6} {'out':>6} {'rank':>6} {'break-even':>10}")
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r['in']:>6} {r['out']:>6} {r['rank'] or 'dense':>6} {r['break_even_rank']:>10.1f}")


@main.command("methods")
def methods_command() -> None:
    """List the compression methods and the calibration statistics each needs."""
    from .methods import METHODS

    for m in METHODS.values():
        click.echo(f"{m.name:<8} {m.summary} (statistics: {', '.join(sorted(m.needs)) or 'none'})")


if __name__ == "__main__":
    main()

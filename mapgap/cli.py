"""The ``mapgap`` command line: one command per pipeline stage, the whole
pipeline, the offline demo, the UIs and evaluation.

Heavy imports (prefect, torch) happen inside commands so ``--help`` is instant,
and after :func:`setup_environment` so Prefect sees our defaults.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mapgap.orchestration import setup_environment

app = typer.Typer(
    help="Find what OpenStreetMap is missing: OSM labels + imagery -> model -> candidates.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="Pipeline config (YAML), e.g. conf/kampala.yaml")]

# stage command -> (flow module, flow function, one-line help)
STAGES: dict[str, tuple[str, str, str]] = {
    "harvest": ("mapgap.flows.harvest", "harvest_flow", "Harvest OSM labels per class."),
    "fetch": ("mapgap.flows.fetch", "fetch_flow", "Fetch imagery onto the tile grid."),
    "align": ("mapgap.flows.align", "align_flow",
              "Align the labels to the imagery (labels.align): shift, redraw masks."),
    "pack": ("mapgap.flows.pack", "pack_flow", "Pack imagery + harvested masks into shards."),
    "train": ("mapgap.flows.train", "train_flow", "Train the model, tracked in MLflow."),
    "mine": ("mapgap.flows.mine", "mine_flow", "Hard-negative mining rounds."),
    "predict": ("mapgap.flows.predict", "predict_flow", "Batch inference + polygons."),
    "dedup": ("mapgap.flows.dedup", "dedup_flow", "Keep what OSM lacks; write review files."),
    "run": ("mapgap.flows.pipeline", "pipeline_flow", "Run the whole pipeline."),
}


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load(config: Path, overrides: dict[str, Any] | None = None) -> Any:
    from mapgap.conf import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as err:
        fail(str(err) + _demo_template_hint(config))


def _demo_template_hint(config: Path) -> str:
    """conf/demo.yaml lacks aoi and sources on purpose: say where the full one is."""
    from mapgap.demo import DEMO_YAML

    if config.resolve() != DEMO_YAML:
        return ""
    return (" -- conf/demo.yaml is a template filled in by `mapgap demo`,"
            " which writes the complete demo-out/demo.yaml")


def one_line(err: BaseException) -> str:
    """An exception as one line: mapgap's own messages already name the file/URL."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if type(err).__module__.startswith("mapgap.") and first:
        return first
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


ForceUnlock = Annotated[bool, typer.Option(
    "--force-unlock", help="Take the run dir's lock even if another run seems to hold it.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks of errors.")]


def run_stage(stage: str, cfg: Any, *, force_unlock: bool = False, debug: bool = False,
              **params: Any) -> Any:
    """Run a stage flow on the run dir, which it holds locked (one run per run dir).

    Errors end the command with one line and exit code 2 (``--debug``: the
    traceback); SIGTERM/SIGINT stop it cleanly (see :class:`mapgap.orchestration.Stopper`).
    """
    from prefect import tags

    from mapgap.lock import RunLock, RunLockedError
    from mapgap.orchestration import Stopper, api_server, configured, recover
    from mapgap.progress import hide_console_tracebacks

    lock = RunLock(cfg.run_uri, force=force_unlock)
    try:
        lock.acquire()
    except RunLockedError as err:
        fail(str(err))
    module, name, _ = STAGES[stage]
    stopper = Stopper(cfg, lock).arm()
    try:
        with api_server() as server_pid:
            stopper.serving(server_pid)
            try:
                recover(cfg, lock)
                flow_obj = getattr(importlib.import_module(module), name)
                if not debug:
                    hide_console_tracebacks()
                with tags(lock.owner.run_tag):
                    return configured(flow_obj, cfg)(cfg, **params)
            finally:
                # A stop kills the children, so the flow may end first: the stop
                # thread ends the process (the API server must outlive it).
                stopper.wait_if_stopping()
    except Exception as err:
        if debug:
            raise
        fail(f"{one_line(err)} (--debug shows the traceback)")
    finally:
        lock.release()


def _register_stage(stage: str) -> None:
    help_text = STAGES[stage][2]

    def command(config: ConfigArg, force_unlock: ForceUnlock = False,
                debug: Debug = False) -> None:
        setup_environment()
        cfg = load(config)
        result = run_stage(stage, cfg, force_unlock=force_unlock, debug=debug)
        typer.echo(json.dumps(result, indent=2, default=str))

    command.__doc__ = help_text
    app.command(name=stage, help=help_text)(command)


for _stage in STAGES:
    if _stage != "run":
        _register_stage(_stage)


@app.command()
def run(
    config: ConfigArg,
    refresh: Annotated[
        str, typer.Option(help="Comma-separated stages to recompute (cache ignored).")
    ] = "",
    force_unlock: ForceUnlock = False,
    debug: Debug = False,
) -> None:
    """Run the whole pipeline; finished tasks of earlier runs are reused."""
    setup_environment()
    cfg = load(config)
    stages = [s for s in refresh.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES) - {"run"})
    if unknown:
        fail(f"--refresh: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    result = run_stage("run", cfg, force_unlock=force_unlock, debug=debug, refresh=stages)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the scene and the run.")] = Path("demo-out"),
    seed: Annotated[int, typer.Option(help="Seed of the synthetic town.")] = 0,
) -> None:
    """Generate the offline demo town and run the pipeline on it (no network)."""
    setup_environment()
    from mapgap.demo import run_demo

    run_demo(out.resolve(), seed)


@app.command()
def ui(
    config: Annotated[
        Path | None, typer.Argument(help="Config whose MLflow store to show (default: demo)")
    ] = None,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
) -> None:
    """Start the Prefect UI and the MLflow UI on 127.0.0.1 and print their URLs."""
    setup_environment()
    from mapgap.ui import serve_uis

    tracking = None
    if config is not None:
        from mapgap.tracking import tracking_uri

        tracking = tracking_uri(load(config))
    serve_uis(prefect_port, mlflow_port, tracking)


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Option(help="Predicted polygons (GeoJSON, 'score' property).")],
    truth: Annotated[Path, typer.Option(help="Reference polygons (GeoJSON).")],
    iou: Annotated[float, typer.Option(help="Match when IoU is above this.")] = 0.5,
) -> None:
    """Object-level precision/recall/F1 (one-to-one, in score order); prints JSON."""
    from mapgap.tasks.evaluate import EvaluationError, evaluate_files

    try:
        result = evaluate_files(pred, truth, iou)
    except EvaluationError as err:
        fail(str(err))
    typer.echo(json.dumps(result, indent=2))


if __name__ == "__main__":  # pragma: no cover
    app()

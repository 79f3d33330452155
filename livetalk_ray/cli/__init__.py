"""`livetalk` command line. Commands that build a model or a run take `--preset`, `--config FILE`, `--set a.b=value`."""

from __future__ import annotations

from typing import Annotated

import typer

from livetalk_ray.cli.data import data_app, demo_data
from livetalk_ray.cli.errors import set_debug
from livetalk_ray.cli.job import job_app
from livetalk_ray.cli.model import evaluate_command, export, generate, model_app
from livetalk_ray.cli.monitor import monitor_command
from livetalk_ray.cli.serve import loadtest_command, serve_command
from livetalk_ray.cli.train import ode_app, pipeline, train_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and serve real-time talking avatars.")


@app.callback()
def main(
    debug: Annotated[
        bool, typer.Option("--debug", help="full tracebacks, user errors included (also LIVETALK_DEBUG=1)")
    ] = False,
) -> None:
    """Train and serve real-time talking avatars."""
    set_debug(debug)


app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(ode_app, name="ode")
app.add_typer(job_app, name="job")
app.command("generate")(generate)
app.command("demo-data")(demo_data)
app.command("export")(export)
app.command("eval")(evaluate_command)
app.command("pipeline")(pipeline)
app.command("serve")(serve_command)
app.command("loadtest")(loadtest_command)
app.command("monitor")(monitor_command)

__all__ = ["app"]

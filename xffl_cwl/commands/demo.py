"""`xffl-cwl demo`: the first thing to run."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("xffl-demo"),
    show_default=True,
    help="Folder for assets, federation.yml and the run.",
)
@click.option("--facilities", type=int, default=3, show_default=True)
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True, help="Local training steps per round.")
@click.option("--timeout", type=float, help="Stop after this many seconds.")
def demo_command(workdir: Path, facilities: int, rounds: int, steps: int, timeout: float | None) -> None:
    """Run a whole federation of local facilities through StreamFlow and print the losses."""
    from xffl_cwl.commands.run import report
    from xffl_cwl.demo import run_demo

    say = lambda text: click.echo(f"xffl-cwl: {text}", err=True)  # noqa: E731
    result = run_demo(workdir, facilities, rounds, steps, say=say, timeout=timeout)
    report(result, workdir / "run")
    click.echo(
        f"edit {workdir / 'federation.yml'}, then: xffl-cwl generate {workdir / 'federation.yml'} -o {workdir / 'run'} --force && xffl-cwl run {workdir / 'run'} --force"
    )

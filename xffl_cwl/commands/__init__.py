"""Thin click commands over the library's plain functions; only click is imported here."""

from xffl_cwl.commands.aggregate import aggregate_command
from xffl_cwl.commands.check import check_command
from xffl_cwl.commands.demo import demo_command
from xffl_cwl.commands.demo_assets import demo_assets_command
from xffl_cwl.commands.evaluate import evaluate_command
from xffl_cwl.commands.generate import generate_command
from xffl_cwl.commands.report import report_command, status_command
from xffl_cwl.commands.run import run_command
from xffl_cwl.commands.train import train_command
from xffl_cwl.commands.validate import validate_command

COMMANDS = [
    demo_command,
    train_command,
    aggregate_command,
    evaluate_command,
    demo_assets_command,
    generate_command,
    validate_command,
    run_command,
    status_command,
    report_command,
    check_command,
]

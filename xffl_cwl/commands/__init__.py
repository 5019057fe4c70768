"""Thin click commands over the library's plain functions; only click is imported here."""

from xffl_cwl.commands.aggregate import aggregate_command
from xffl_cwl.commands.demo_assets import demo_assets_command
from xffl_cwl.commands.evaluate import evaluate_command
from xffl_cwl.commands.train import train_command

COMMANDS = [train_command, aggregate_command, evaluate_command, demo_assets_command]

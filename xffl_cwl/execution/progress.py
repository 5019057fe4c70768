"""StreamFlow's log events as sentences: per round, who started and finished with which losses, who
was left out and why, the aggregation, the global held-out loss; and a failure in one line naming
the facility or step, the round, the reason and the log to read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xffl_cwl.contract.layout import BASELINE_STEP, FACILITY_CONNECTOR, STREAMFLOW_LOG, TOOL_LOGS, tool_of_step
from xffl_cwl.execution.run_folder import RunFolder
from xffl_cwl.execution.streamflow_log import LogEvent


def number(value: float | int | None, spec: str = ".3f") -> str:
    """A number for a progress line; `?` for a value a record did not have (or had malformed)."""
    return "?" if value is None else format(value, spec)


@dataclass
class Progress:
    """What has happened so far in one attempt, to turn events into sentences."""

    folder: RunFolder
    first_round: int
    last_round: int
    say: Callable[[str], None]

    def round_label(self, round_number: int | None) -> str:
        return f"round {round_number}/{self.last_round}" if round_number is not None else "round ?"

    def round_of(self, event: LogEvent) -> int | None:
        if event.summary is not None and event.summary.round is not None:
            return event.summary.round
        return None if event.iteration is None else self.first_round + event.iteration

    def handle(self, event: LogEvent) -> None:
        e = event.summary
        if event.kind == "started" and event.step and tool_of_step(event.step) == "train":
            where = self.folder.deployment_of(event.step)
            self.say(f"{self.round_label(self.round_of(event))}: training started at {where}")
        elif event.kind == "trained" and e is not None:
            loss, held = e.train_loss, e.held_out
            held_text = (
                f", held-out {number(held.before)} -> {number(held.after)}" if held and held.after is not None else ""
            )
            losses = f"train loss {number(loss.first)} -> {number(loss.last)}" if loss else "train loss ?"
            self.say(
                f"{self.round_label(e.round)}: {e.facility or '?'} finished {number(e.steps, 'd')} steps, {losses}{held_text}"
            )
        elif event.kind in ("left_out", "left_out_warning") and e is not None:
            self.say(f"{self.round_label(e.round)}: {e.facility or '?'} is left out of this round: {e.reason or '?'}")
        elif event.kind == "aggregated" and e is not None:
            extra = f", rejected {', '.join(f'{r.facility} ({r.reason})' for r in e.rejected)}" if e.rejected else ""
            extra += f", left out {', '.join(x.facility for x in e.left_out)}" if e.left_out else ""
            self.say(
                f"{self.round_label(e.round)}: aggregated with {e.strategy or '?'}, {number(e.samples, 'd')} samples, "
                f"update norm {number(e.update_norm)}{extra}"
            )
        elif event.kind == "evaluated" and e is not None:
            label = "baseline" if e.round == self.first_round - 1 else self.round_label(e.round)
            self.say(
                f"{label}: global held-out loss {e.eval_loss:.4f}" if e.eval_loss is not None else f"{label}: recorded"
            )

    def describe_failure(self, event: LogEvent) -> str:
        step = event.step or "?"
        name = step.rsplit("/", 1)[-1]
        tool = tool_of_step(step)
        where = self.folder.deployment_of(step) or "?"
        round_number = self.round_of(event)
        who = f"facility {where}" if tool == "train" else f"step {name} (on {where})"
        when = "" if round_number is None or name == BASELINE_STEP else f" in {self.round_label(round_number)}"
        log_hint, last_line = self._tool_log(event, tool, where)
        reason = last_line or event.message
        return f"{who} failed{when}{': ' + reason if reason else ''}; read {log_hint}"

    def _tool_log(self, event: LogEvent, tool: str, deployment: str) -> tuple[str, str | None]:
        log_name = TOOL_LOGS.get(tool)
        if event.directory is None or log_name is None:
            return str(self.folder.root / STREAMFLOW_LOG), None
        path = Path(event.directory) / log_name
        if (self.folder.deployments.get(deployment) or {}).get("type") == FACILITY_CONNECTOR:
            return f"{deployment}:{path}", self._remote_last_line(deployment, str(path))
        try:
            lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return str(path), None
        return str(path), (lines[-1][:1000] if lines else None)

    def _remote_last_line(self, deployment: str, path: str) -> str | None:
        """The facility's copy of the log is the only one: read its last line over SSH."""
        import asyncio

        from xffl_cwl.contract.facility import FacilityConfig
        from xffl_cwl.facility.preflight import remote_tail

        try:
            config = FacilityConfig.from_streamflow((self.folder.deployments.get(deployment) or {}).get("config") or {})
            text = asyncio.run(asyncio.wait_for(remote_tail(config, self.folder.root, path, 1), 20))
        except Exception:  # the failure report must not fail: without the line, the path is still named
            return None
        return text.strip()[:1000] if text else None

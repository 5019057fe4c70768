"""Running a run folder: the runners' commands, StreamFlow's log as events, and the watchdog."""

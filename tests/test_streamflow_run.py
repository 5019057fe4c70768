"""The federation end to end: `xffl-cwl demo` through real StreamFlow (cwltool runs the same folders in test_run_failure)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "xffl-demo"
    proc = run_cli("demo", "--workdir", workdir, "--facilities", "2", "--rounds", "2", "--steps", "5", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_demo_runs_every_round_through_streamflow(demo):
    workdir, proc = demo
    history = [json.loads(line) for line in (workdir / "run" / "out" / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"] - 0.5
    for record in history[1:]:
        assert set(record["facilities"]) == {"leonardo", "lumi"} and record["rejected"] == []
    # progress on stderr, the table on stdout
    assert "round 2/2: aggregated with fedavg" in proc.stderr
    assert "global held-out loss" in proc.stdout
    assert f"{history[-1]['eval_loss']:.4f}" in proc.stdout


def test_each_facility_trained_in_its_own_workdir(demo):
    workdir, _ = demo
    work = workdir / "run" / "work"
    for facility in ("leonardo", "lumi"):
        updates = sorted(work.joinpath(facility).glob(f"*/{facility}/update.json"))
        assert len(updates) == 2, facility
        assert {json.loads(u.read_text())["facility"] for u in updates} == {facility}
        assert {json.loads(u.read_text())["round"] for u in updates} == {1, 2}
    assert sorted(p.name for p in work.joinpath("aggregator").glob("*/model/aggregate.json")) == ["aggregate.json"] * 2
    # nothing escaped the run folder's own scratch space
    assert (workdir / "run" / "streamflow.log").is_file() and (workdir / "run" / ".streamflow" / "sqlite.db").is_file()


def test_final_model_loads(demo):
    from transformers import AutoModelForCausalLM

    workdir, _ = demo
    model = AutoModelForCausalLM.from_pretrained(workdir / "run" / "out" / "model", local_files_only=True)
    assert model.config.model_type == "llama"


def test_report_of_the_demo_run(demo):
    """`xffl-cwl report` on the finished demo: PNGs, a self-contained page with every round and facility,
    bytes that match what was moved, and an RO-Crate whose every reference resolves."""
    from report_checks import check_report

    workdir, _ = demo
    run_dir = workdir / "run"
    page, data = check_report(run_dir, [1, 2], ["leonardo", "lumi"])
    history = [json.loads(line) for line in (run_dir / "out" / "history.jsonl").read_text().splitlines()]
    assert [r["eval_loss"] for r in data["rounds"]] == [h["eval_loss"] for h in history[1:]]
    assert data["baseline_loss"] == history[0]["eval_loss"]
    # round 1 sends the whole model, round 2 the change, to each facility
    model_bytes = sum(p.stat().st_size for p in (workdir / "assets" / "model").iterdir())
    for name in ("leonardo", "lumi"):
        first, second = (r["facilities"][name] for r in data["rounds"])
        assert first["down_kind"] == "model" and first["bytes_down"] == model_bytes
        assert second["down_kind"] == "change" and 0 < second["bytes_down"] < model_bytes * 1.1
        assert first["update_digest"] != second["update_digest"]
    assert data["identity"]["federation.yml"].startswith("sha256:")
    identity = next(t for t in page.tables if t and t[0] == ["", "value"])
    assert any(row[0] == "federation.yml" and row[1] == data["identity"]["federation.yml"] for row in identity)
    status = run_cli("status", run_dir)
    assert status.returncode == 0 and "finished, 2 of 2 rounds done" in status.stdout
    assert f"{history[-1]['eval_loss']:.4f} (round 2)" in status.stdout
    watched = run_cli("status", run_dir, "--watch", "--interval", "0.5", timeout=30)  # an ended run: shown once
    assert watched.returncode == 0 and watched.stdout == status.stdout

    crate = workdir / "crate"
    proc = run_cli("report", run_dir, "--ro-crate", crate)
    assert proc.returncode == 0, proc.stderr
    metadata = json.loads((crate / "ro-crate-metadata.json").read_text())
    graph = {e["@id"]: e for e in metadata["@graph"]}

    def refs(value):
        if isinstance(value, dict):
            if set(value) == {"@id"}:
                yield value["@id"]
            else:
                for v in value.values():
                    yield from refs(v)
        elif isinstance(value, list):
            for v in value:
                yield from refs(v)

    dangling = {r for e in graph.values() for k, v in e.items() if k != "@id" for r in refs(v)} - set(graph)
    assert {r for r in dangling if not r.startswith("https://")} == set()
    assert graph["./"]["mainEntity"] == {"@id": "main.cwl"}
    for entity in graph.values():
        types = entity["@type"] if isinstance(entity["@type"], list) else [entity["@type"]]
        if "File" in types:
            assert (crate / entity["@id"]).is_file(), entity["@id"]
    trains = [e for e in graph.values() if e["@id"].startswith("#job-train-")]
    assert len(trains) == 4 and all(e["actionStatus"].endswith("CompletedActionStatus") for e in trains)
    final = graph["#model-round-2"]["identifier"]
    assert final == history[-1]["fingerprint"]


HOSTILE_UPDATE_RECORDS = {
    "not UTF-8": b"\xff\xfe\x00{garbage",
    "a list": b"[1, 2, 3]",
    "markup and escapes": json.dumps(
        {
            "format": "xffl-update",
            "facility": "<script>alert(1)</script>",
            "encoding": '"><img src=x onerror=alert(1)>',
            "software": {"torch": "<b>x</b>", "\x1b]0;owned\x07": "1", "ok": "2.0"},
            "container": {"runtime": "podman", "image": "<script>", "digest": "a b", "build": "\u202e"},
        }
    ).encode(),
    "deeply nested": b"[" * 100000 + b"]" * 100000,
    "huge": b'{"software": {"a": "' + b"x" * (2 << 20) + b'"}}',
}


@pytest.mark.parametrize("case", sorted(HOSTILE_UPDATE_RECORDS))
def test_report_and_status_of_hostile_records(demo, tmp_path, case):
    """What facilities wrote reaches the report and status as escaped, bounded text, never as markup,
    a terminal escape or a traceback: update.json as raw bytes, a reason with markup, a FIFO."""
    import os
    import shutil

    workdir, _ = demo
    run_dir = tmp_path / "run"
    shutil.copytree(workdir / "run", run_dir, symlinks=True)
    for path in run_dir.rglob("*"):  # the copy's own paths, so the report reads this copy
        if path.is_file() and not path.is_symlink() and path.suffix in (".log", ".jsonl", ".json", ".yml"):
            path.write_text(path.read_text(errors="replace").replace(str(workdir / "run"), str(run_dir)))
    updates = sorted(run_dir.glob("work/*/*/leonardo/update.json"))
    assert updates
    for update in updates:
        update.write_bytes(HOSTILE_UPDATE_RECORDS[case])
    lumi = sorted(run_dir.glob("work/*/*/lumi/update.json"))
    os.unlink(lumi[0])
    os.mkfifo(lumi[0])  # reading it would block forever
    aggregate = next(run_dir.glob("work/aggregator/*/model/aggregate.json"))
    record = json.loads(aggregate.read_text())
    record["facilities"].pop("lumi")
    record["left_out"] = [{"facility": "lumi", "reason": "<script>alert(2)</script>\x1b[2J"}]
    aggregate.write_text(json.dumps(record))
    from xffl_cwl.report.page import write_report
    from xffl_cwl.report.run_view import read_run
    from xffl_cwl.report.status import status_text

    page = write_report(run_dir)[0].read_text()  # the functions `report` and `status` are thin commands over
    for raw in ("<script", "<img src=x", "<b>x</b>", "\x1b", "\u202e"):
        assert raw not in page, raw
    assert "&lt;script&gt;alert(2)&lt;/script&gt;?[2J" in page  # lumi's reason, shown as text
    if case == "markup and escapes":
        assert "&lt;b&gt;x&lt;/b&gt;" not in page  # non-printable-checked software versions are dropped whole
    status = status_text(read_run(run_dir))
    assert "\x1b" not in status, status
    assert "lumi in round " in status and "<script>alert(2)</script>?[2J" in status

"""Fast staging through the xffl-facility connector, on the real test facilities: the same files, paths
and modes as StreamFlow's own SSH copy, nothing left running after a cancelled copy, clean errors.
Speed is measured by benchmarks/staging.py, not here."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from streamflow.core.deployment import ExecutionLocation
from streamflow.core.exception import WorkflowExecutionException
from streamflow.deployment.connector.ssh import SSHConnector

from streamflow_plugins.xffl_facility.connector import XfflFacilityConnector

Tree = dict[str, tuple[str, int, str]]  # relative path -> (kind, permission bits, sha256 of a file's bytes)


def _connector(facilities: dict, name: str, config_dir: Path) -> XfflFacilityConnector:
    f = facilities["by_name"][name]
    return XfflFacilityConnector(
        name,
        str(config_dir),
        host=f["host"],
        port=f["port"],
        username=f["username"],
        sshKey=facilities["key"],
        knownHosts=facilities["known_hosts"],
    )


async def _with(
    facilities: dict, names: tuple[str, ...], config_dir: Path, body: Callable[..., Awaitable[None]]
) -> None:
    """Deploy a connector per facility, run `body(connector, location, ...)`, always undeploy."""
    connectors = [_connector(facilities, name, config_dir) for name in names]
    try:
        args = []
        for connector in connectors:
            await connector.deploy(False)
            available = next(iter((await connector.get_available_locations()).values()))
            args += [connector, available.location]
        await body(*args)
    finally:
        for connector in connectors:
            await connector.undeploy(False)


def _model_tree(root: Path) -> Path:
    """A model-like directory with what a copy can get wrong: nesting, a symlink, an empty file,
    a space in a name, an executable and a private file."""
    model = root / "model dir"
    (model / "sub" / "deeper").mkdir(parents=True)
    (model / "sub" / "deeper" / "weights.bin").write_bytes(os.urandom(300_000))
    (model / "config.json").write_text('{"model_type": "tiny"}')
    (model / "empty").write_bytes(b"")
    (model / "with space.txt").write_text("spaces survive\n")
    (model / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (model / "run.sh").chmod(0o755)
    (model / "private").write_text("only me\n")
    (model / "private").chmod(0o600)
    (model / "link.bin").symlink_to("sub/deeper/weights.bin")
    return model


def _local_tree(root: Path) -> Tree:
    tree: Tree = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        kind = "l" if stat.S_ISLNK(mode) else "d" if stat.S_ISDIR(mode) else "f"
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if kind == "f" else ""
        tree[str(path.relative_to(root))] = (kind, stat.S_IMODE(mode), digest)
    return tree


async def _remote_tree(connector: XfflFacilityConnector, location: ExecutionLocation, root: str) -> Tree:
    script = (
        f"cd '{root}' && find . -mindepth 1 -printf '%P\\t%y\\t%m\\n' | sort && echo --- && "
        "find . -type f -exec sha256sum {} + | sed 's|  \\./|\\t|'"
    )
    output, status = await connector.run(location, [f"sh -c {_quote(script)}"], capture_output=True)
    assert status == 0, output
    listing, sums = output.split("---\n")
    digests = {path: digest for digest, path in (line.split("\t", 1) for line in sums.splitlines())}
    tree: Tree = {}
    for line in listing.splitlines():
        path, kind, mode = line.split("\t")
        tree[path] = (kind, int(mode, 8), digests.get(path, ""))
    return tree


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _expected(source: Path) -> Tree:
    """What StreamFlow's tar path makes of `source`: the symlink becomes a copy of its target."""
    tree = _local_tree(source)
    target = source / "sub" / "deeper" / "weights.bin"
    tree["link.bin"] = ("f", stat.S_IMODE(target.stat().st_mode), tree["sub/deeper/weights.bin"][2])
    return tree


def _remote_base(facilities: dict) -> str:
    return f"{facilities['by_name']['leonardo']['workdir']}/staging-{uuid.uuid4().hex[:8]}"


def test_a_tree_travels_to_a_facility_and_back_exactly_as_streamflows_own_copy_moves_it(facilities, tmp_path):
    source = _model_tree(tmp_path / "src")
    expected = _expected(source)
    base = _remote_base(facilities)

    async def body(leonardo, at_leonardo, lumi, at_lumi) -> None:
        leonardo.fast_copy_min_bytes = lumi.fast_copy_min_bytes = 0  # the small tree takes the fast path too
        assert leonardo.openssh() is not None
        await leonardo.run(at_leonardo, ["mkdir", "-p", f"{base}/into", f"{base}/into-ref"])
        try:
            # a new destination, and an existing directory (the copy lands inside it, under the source's name)
            await leonardo.copy_local_to_remote(str(source), f"{base}/fast", [at_leonardo])
            await SSHConnector.copy_local_to_remote(leonardo, str(source), f"{base}/ref", [at_leonardo])
            await leonardo.copy_local_to_remote(str(source), f"{base}/into", [at_leonardo])
            await SSHConnector.copy_local_to_remote(leonardo, str(source), f"{base}/into-ref", [at_leonardo])
            fast = await _remote_tree(leonardo, at_leonardo, f"{base}/fast")
            assert fast == expected
            assert fast == await _remote_tree(leonardo, at_leonardo, f"{base}/ref")
            assert await _remote_tree(leonardo, at_leonardo, f"{base}/into/{source.name}") == expected
            assert await _remote_tree(leonardo, at_leonardo, f"{base}/into-ref/{source.name}") == expected
            # back: a directory into a new path, a file into an existing directory
            await leonardo.copy_remote_to_local(f"{base}/fast", str(tmp_path / "back"), at_leonardo)
            await SSHConnector.copy_remote_to_local(leonardo, f"{base}/fast", str(tmp_path / "back-ref"), at_leonardo)
            assert _local_tree(tmp_path / "back") == _local_tree(tmp_path / "back-ref") == expected
            (tmp_path / "scripts").mkdir()
            await leonardo.copy_remote_to_local(f"{base}/fast/run.sh", str(tmp_path / "scripts"), at_leonardo)
            assert _local_tree(tmp_path / "scripts") == {"run.sh": expected["run.sh"]}
            # between two facilities, relayed here
            lumi_dir = f"{facilities['by_name']['lumi']['workdir']}/staging-{uuid.uuid4().hex[:8]}"
            await lumi.copy_remote_to_remote(f"{base}/fast", lumi_dir, [at_lumi], at_leonardo, leonardo)
            try:
                assert await _remote_tree(lumi, at_lumi, lumi_dir) == expected
            finally:
                await lumi.run(at_lumi, ["rm", "-rf", lumi_dir])
        finally:
            await leonardo.run(at_leonardo, ["rm", "-rf", base])

    asyncio.run(_with(facilities, ("leonardo", "lumi"), tmp_path, body))


def _children(names: tuple[str, ...] = ("ssh", "tar", "scp")) -> dict[int, str]:
    """This test process's child processes with one of `names` that are still running (not zombies)."""
    found = {}
    for pid in subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split():
        try:
            stat_line = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, state = (
            stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")],
            stat_line.rsplit(")", 1)[1].split()[0],
        )
        if name in names and state != "Z":
            found[int(pid)] = name
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_cancelled_copy_raises_and_leaves_no_ssh_or_tar_behind(facilities, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "weights.bin", "wb") as fh:  # sparse: 1 GiB on the wire, nothing on disk here
        fh.truncate(2**30)
    base = _remote_base(facilities)
    seen: dict[int, str] = {}

    async def body(leonardo, at_leonardo) -> None:
        assert not _children(), "an earlier copy left processes behind"
        copy = asyncio.create_task(leonardo.copy_local_to_remote(str(big), base, [at_leonardo]))
        try:
            deadline = time.monotonic() + 20
            while set(seen.values()) != {"ssh", "tar"} and not copy.done() and time.monotonic() < deadline:
                seen.update(_children())
                await asyncio.sleep(0.05)
            assert set(seen.values()) == {"ssh", "tar"}, f"the copy did not start its pipeline: {seen}"
            await asyncio.sleep(0.5)
            assert not copy.done(), "the copy ended before it could be cancelled; use a larger file"
            copy.cancel()
            cancelled_at = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await copy
            assert time.monotonic() - cancelled_at < 5
            assert not [pid for pid in seen if _alive(pid)], f"left running: {seen}"
            size, _ = await leonardo.run(at_leonardo, [f"stat -c %s {base}/weights.bin"], capture_output=True)
            assert int(size) < 2**30, "the copy went on after it was cancelled"
        finally:
            await leonardo.run(at_leonardo, ["rm", "-rf", base])

    asyncio.run(_with(facilities, ("leonardo",), tmp_path, body))
    assert not _children()


def test_copies_that_cannot_happen_are_clean_errors_naming_facility_and_path(facilities, tmp_path):
    forbidden = Path("/var/tmp") / f"xffl-forbidden-{uuid.uuid4().hex[:8]}"
    forbidden.mkdir(mode=0o700)  # root's: the facility user may not write there
    source = _model_tree(tmp_path / "src")

    async def body(leonardo, at_leonardo) -> None:
        leonardo.fast_copy_min_bytes = 0
        started = time.monotonic()
        with pytest.raises(WorkflowExecutionException) as refused:
            await asyncio.wait_for(
                leonardo.copy_local_to_remote(str(source), f"{forbidden}/model", [at_leonardo]), timeout=60
            )
        message = str(refused.value)
        assert message.startswith("deployment leonardo (hpc_leonardo@127.0.0.1:2222): cannot copy "), message
        assert f"{forbidden}/model" in message and "Permission denied" in message, message
        missing = f"{facilities['by_name']['leonardo']['workdir']}/no-such-{uuid.uuid4().hex[:8]}"
        with pytest.raises(WorkflowExecutionException, match=rf"deployment leonardo .*cannot read {missing}"):
            await asyncio.wait_for(
                leonardo.copy_remote_to_local(missing, str(tmp_path / "back"), at_leonardo), timeout=60
            )
        assert time.monotonic() - started < 30
        assert not _children()

    try:
        asyncio.run(_with(facilities, ("leonardo",), tmp_path, body))
    finally:
        forbidden.rmdir()

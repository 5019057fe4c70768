"""Staging speed to and from SSH facilities: `scp -r`, the xffl-facility connector's copy (as StreamFlow
calls it) and StreamFlow's own SSHConnector copy, on the same link with the same login options.

A model-like directory (4 x 256 MiB of random bytes and a few small files; --size-mib scales it) is
copied to one facility, back from it, and to two facilities at once and one after the other. Runs of
the methods alternate (the order rotates every repeat) because a shared machine is noisy; each run,
the medians, MB/s and the speed ratios to scp are printed. Every method's copy is checked by sha256
once. By default the facilities are those of scripts/facilities.sh; --streamflow-yml measures the
`xffl-facility` deployments of a run folder instead (then give --remote-dir, a directory there).

    python3 benchmarks/staging.py [--repeats 3] [--size-mib 1024] [--facility leonardo --second lumi]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from streamflow.core.deployment import ExecutionLocation
from streamflow.deployment.connector.ssh import SSHConnector

from streamflow_plugins.xffl_facility.connector import XfflFacilityConnector

FACILITIES_JSON = Path(os.environ.get("XFFL_FACILITIES_DIR", "/var/tmp/xffl-facilities")) / "facilities.json"


class Site:
    """One facility: its connector (deployed), its login location, and a scratch directory there."""

    def __init__(self, name: str, connector: XfflFacilityConnector, remote_dir: str) -> None:
        self.name, self.connector, self.remote_dir = name, connector, remote_dir
        self.location: ExecutionLocation | None = None

    async def start(self) -> None:
        await self.connector.deploy(False)
        self.location = next(iter((await self.connector.get_available_locations()).values())).location
        await self.shell(f"mkdir -p {shlex.quote(self.remote_dir)}")  # also opens StreamFlow's connection

    async def shell(self, command: str) -> str:
        output, status = await self.connector.run(self.location, [command], capture_output=True)
        if status != 0:
            raise RuntimeError(f"{self.name}: {command}: {output}")
        return output

    def scp(self) -> list[str]:
        """scp with exactly the connector's ssh options (the login, known_hosts, ciphers, no compression)."""
        ssh = self.connector.openssh()
        if ssh is None:
            raise SystemExit(f"{self.name}: OpenSSH cannot log in as StreamFlow does (password/passphrase file)")
        options = ssh[1 : ssh.index("-p")]
        return ["scp", "-q", "-r", *options, "-P", ssh[ssh.index("-p") + 1]]

    def remote(self, path: str) -> str:
        login = self.connector.login
        return f"{login.username}@{login.host}:{path}"


def make_model(root: Path, size_mib: int) -> dict[str, str]:
    """The model directory (made once, kept between runs); sha256 of each file."""
    shard = size_mib * 2**20 // 4
    digests_file = root / ".digests.json"
    if digests_file.exists():
        digests = json.loads(digests_file.read_text())
        if digests.get("size") == size_mib:
            return digests["files"]
    shutil.rmtree(root / "model", ignore_errors=True)
    (root / "model").mkdir(parents=True)
    files: dict[str, bytes] = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": os.urandom(40_000)}
    files["generation_config.json"] = b"{}"
    for name, data in files.items():
        (root / "model" / name).write_bytes(data)
    for i in range(4):
        with open(root / "model" / f"model-0000{i + 1}-of-00004.safetensors", "wb") as fh:
            for _ in range(shard // 2**24):
                fh.write(os.urandom(2**24))
            fh.write(os.urandom(shard % 2**24))
    digests = {p.name: _sha256(p) for p in sorted((root / "model").iterdir())}
    digests_file.write_text(json.dumps({"size": size_mib, "files": digests}))
    return digests


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(2**22):
            h.update(chunk)
    return h.hexdigest()


async def remote_digests(site: Site, path: str) -> dict[str, str]:
    output = await site.shell(f"cd {shlex.quote(path)} && sha256sum -- *")
    return {line.split(None, 1)[1].strip(): line.split(None, 1)[0] for line in output.splitlines()}


def local_digests(path: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(path.iterdir())}


def own_cpu() -> float:
    """CPU seconds of this process (StreamFlow's event loop thread does all of its copying)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def timed(action: Callable[[], Awaitable[Any]], cpu: list[float]) -> float:
    """Wall seconds of `action`; the orchestrator's own CPU seconds are appended to `cpu`."""
    started, cpu_started = time.perf_counter(), own_cpu()
    await action()
    cpu.append(own_cpu() - cpu_started)
    return time.perf_counter() - started


async def run_scp(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)}: {err.decode().strip()}")


def report(
    title: str,
    results: dict[str, list[float]],
    cpu: dict[str, list[float]],
    nbytes: int,
    reference: str | None = "scp -r",
) -> None:
    print(f"\n{title}")
    medians = {name: statistics.median(times) for name, times in results.items()}
    for name, times in results.items():
        runs = " ".join(f"{t:6.2f}" for t in times)
        rate = nbytes / medians[name] / 1e6
        ratio = f"  x{medians[reference] / medians[name]:.2f} of {reference}" if reference in medians else ""
        python = statistics.median(cpu[name])
        print(
            f"  {name:<28} runs [s] {runs}   median {medians[name]:6.2f} s {rate:7.1f} MB/s{ratio}"
            f"   orchestrator CPU {python:5.2f} s"
        )


async def one_way(sites: list[Site], source: Path, digests: dict[str, str], repeats: int, nbytes: int) -> None:
    site = sites[0]
    dst = f"{site.remote_dir}/model"
    methods: dict[str, Callable[[], Awaitable[Any]]] = {
        "scp -r": lambda: run_scp([*site.scp(), str(source), site.remote(dst)]),
        "connector": lambda: site.connector.copy_local_to_remote(str(source), dst, [site.location]),
        "streamflow SSHConnector": lambda: SSHConnector.copy_local_to_remote(
            site.connector, str(source), dst, [site.location]
        ),
    }
    results: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(repeats):
        order = list(methods)[repeat % len(methods) :] + list(methods)[: repeat % len(methods)]
        for name in order:
            await site.shell(f"rm -rf {shlex.quote(dst)}")
            seconds = await timed(methods[name], cpu[name])
            results[name].append(seconds)
            print(f"  to {site.name}, run {repeat + 1}: {name:<24} {seconds:6.2f} s", flush=True)
            if repeat == 0 and await remote_digests(site, dst) != digests:
                raise SystemExit(f"{name}: the copy on {site.name} differs from the source")
    report(f"local -> {site.name}, {nbytes / 2**20:.0f} MiB ({repeats} runs each, alternating)", results, cpu, nbytes)


async def back(sites: list[Site], scratch: Path, digests: dict[str, str], repeats: int, nbytes: int) -> None:
    site = sites[0]
    src = f"{site.remote_dir}/model"  # left there by one_way
    dst = scratch / "back"
    methods: dict[str, Callable[[], Awaitable[Any]]] = {
        "scp -r": lambda: run_scp([*site.scp(), site.remote(src), str(dst)]),
        "connector": lambda: site.connector.copy_remote_to_local(src, str(dst), site.location),
        "streamflow SSHConnector": lambda: SSHConnector.copy_remote_to_local(
            site.connector, src, str(dst), site.location
        ),
    }
    results: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(repeats):
        order = list(methods)[repeat % len(methods) :] + list(methods)[: repeat % len(methods)]
        for name in order:
            shutil.rmtree(dst, ignore_errors=True)
            seconds = await timed(methods[name], cpu[name])
            results[name].append(seconds)
            print(f"  from {site.name}, run {repeat + 1}: {name:<22} {seconds:6.2f} s", flush=True)
            if repeat == 0 and local_digests(dst) != digests:
                raise SystemExit(f"{name}: the copy from {site.name} differs from the source")
    shutil.rmtree(dst, ignore_errors=True)
    report(f"{site.name} -> local, {nbytes / 2**20:.0f} MiB ({repeats} runs each, alternating)", results, cpu, nbytes)


async def two_sites(sites: list[Site], source: Path, digests: dict[str, str], repeats: int, nbytes: int) -> None:
    def copy(site: Site, own: bool) -> Awaitable[None]:
        dst = f"{site.remote_dir}/model2"
        if own:
            return SSHConnector.copy_local_to_remote(site.connector, str(source), dst, [site.location])
        return site.connector.copy_local_to_remote(str(source), dst, [site.location])

    async def sequential(own: bool) -> None:
        for site in sites:
            await copy(site, own)

    async def parallel(own: bool) -> None:
        await asyncio.gather(*(copy(site, own) for site in sites))

    methods: dict[str, Callable[[], Awaitable[Any]]] = {
        "connector, one after other": lambda: sequential(False),
        "connector, at once": lambda: parallel(False),
        "streamflow, one after other": lambda: sequential(True),
        "streamflow, at once": lambda: parallel(True),
    }
    results: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(repeats):
        order = list(methods)[repeat % len(methods) :] + list(methods)[: repeat % len(methods)]
        for name in order:
            for site in sites:
                await site.shell(f"rm -rf {shlex.quote(site.remote_dir)}/model2")
            seconds = await timed(methods[name], cpu[name])
            results[name].append(seconds)
            print(f"  to {'+'.join(s.name for s in sites)}, run {repeat + 1}: {name:<28} {seconds:6.2f} s", flush=True)
            if repeat == 0:
                for site in sites:
                    if await remote_digests(site, f"{site.remote_dir}/model2") != digests:
                        raise SystemExit(f"{name}: the copy on {site.name} differs from the source")
    names = "+".join(s.name for s in sites)
    report(f"local -> {names} ({nbytes * len(sites) / 2**20:.0f} MiB in all)", results, cpu, nbytes * len(sites), None)
    for kind in ("connector", "streamflow"):
        seq = statistics.median(results[f"{kind}, one after other"])
        par = statistics.median(results[f"{kind}, at once"])
        print(f"  {kind}: at once is x{seq / par:.2f} as fast as one after the other")


def build_sites(args: argparse.Namespace) -> list[Site]:
    names = [args.facility] + ([args.second] if args.second else [])
    sites = []
    if args.streamflow_yml:
        import yaml

        config = yaml.safe_load(Path(args.streamflow_yml).read_text())
        base = str(Path(args.streamflow_yml).resolve().parent)
        if not args.remote_dir:
            raise SystemExit("--remote-dir is needed with --streamflow-yml (a directory on every facility)")
        for name in names:
            deployment = config["deployments"][name]
            if deployment["type"] != "xffl-facility":
                raise SystemExit(f"{name} is a {deployment['type']} deployment, not xffl-facility")
            connector = XfflFacilityConnector(name, base, **deployment.get("config", {}))
            sites.append(Site(name, connector, f"{args.remote_dir}/xffl-staging-bench-{os.getpid()}"))
        return sites
    facts = json.loads(FACILITIES_JSON.read_text())
    by_name = {f["name"]: f for f in facts["facilities"]}
    for name in names:
        f = by_name[name]
        connector = XfflFacilityConnector(
            name,
            tempfile.gettempdir(),
            host=f["host"],
            port=f["port"],
            username=f["username"],
            sshKey=facts["key"],
            knownHosts=facts["known_hosts"],
        )
        sites.append(Site(name, connector, f"{args.remote_dir or f['workdir']}/xffl-staging-bench-{os.getpid()}"))
    return sites


async def main(args: argparse.Namespace) -> None:
    scratch = Path(args.workdir)
    digests = make_model(scratch, args.size_mib)
    source = scratch / "model"
    nbytes = sum(p.stat().st_size for p in source.iterdir())
    sites = build_sites(args)
    if args.fast_copy_min_mib is not None:
        for site in sites:
            site.connector.fast_copy_min_bytes = int(args.fast_copy_min_mib * 2**20)
    try:
        for site in sites:
            await site.start()
        print(f"source {source}: {nbytes / 2**20:.0f} MiB in {len(digests)} files; ssh: {shlex.join(sites[0].scp())}")
        await one_way(sites, source, digests, args.repeats, nbytes)
        if not args.no_reverse:
            await back(sites, scratch, digests, args.repeats, nbytes)
        if len(sites) > 1:
            await two_sites(sites, source, digests, args.repeats, nbytes)
    finally:
        for site in sites:
            if site.location is not None:
                await site.shell(f"rm -rf {shlex.quote(site.remote_dir)}")
            await site.connector.undeploy(False)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the model directory (4 shards)")
    parser.add_argument("--facility", default="leonardo")
    parser.add_argument("--second", default="lumi", help="second facility for the two-at-once runs ('' to skip)")
    parser.add_argument("--no-reverse", action="store_true", help="skip facility -> local")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "xffl-staging-bench"))
    parser.add_argument("--streamflow-yml", help="measure the xffl-facility deployments of this streamflow.yml")
    parser.add_argument("--remote-dir", help="scratch directory on the facilities (default: their test workdir)")
    parser.add_argument(
        "--fast-copy-min-mib", type=float, help="the connector's threshold for its OpenSSH path (default: its own)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    import logging

    logging.getLogger("streamflow").setLevel(logging.WARNING)
    asyncio.run(main(parse()))
    sys.exit(0)

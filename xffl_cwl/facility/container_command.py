"""How a job script runs its command inside the facility's image, for each container runtime.

The presets write `{{ container_setup }}` then `{{ container_exec }} {{ streamflow_command }}`; this
module gives both for the runtime, image, options and binds the facility ends up with. The setup lines
name the image and its digest for the tools' records (podman's image ID, the sha256 of a .sif) and
stop the job at once, with one line, when the image is not there.
"""

from __future__ import annotations

import shlex
from typing import Any

# Forwarded into a podman container (apptainer and singularity pass the whole environment already):
# SLURM's variables tell the tools their allocation, ours carry the deadline, status file and identity.
PODMAN_ENV = ("SLURM_*", "XFFL_*", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "NCCL_*")


def standard_options(runtime: str, gpu_vendor: str | None, gpus: int) -> list[str]:
    """A runtime's options when the facility names a runtime other than its template's and no options."""
    if runtime == "podman":
        devices = []
        if gpus > 0 and gpu_vendor == "nvidia":
            devices = ["--device=nvidia.com/gpu=all"]  # CDI, as nvidia-container-toolkit sets it up
        elif gpus > 0 and gpu_vendor == "amd":
            devices = ["--device=/dev/kfd", "--device=/dev/dri", "--group-add=keep-groups"]
        return ["--network=host", *devices]  # the workers of several nodes reach each other on the host's network
    if runtime in ("apptainer", "singularity") and gpus > 0:
        return {"nvidia": ["--nv"], "amd": ["--rocm"]}.get(gpu_vendor or "", [])
    return []


def _podman_run(options: str, binds: list[str], named: bool) -> str:
    """`podman run` up to the working directory and the image; the job's own container is named, so its
    TERM trap can stop it (setup_lines), the workers' containers are not."""
    env = " ".join(f"--env={shlex.quote(name)}" for name in PODMAN_ENV)
    volumes = " ".join(f"--volume={shlex.quote(f'{p}:{p}')}" for p in binds)
    # The image's entry point (tini -g) hands SIGTERM to the whole command, so a stopped container's
    # training ends cleanly; --rm leaves nothing behind in the user's storage.
    name = '--replace --name="$XFFL_CONTAINER_NAME" --sig-proxy=false' if named else ""
    return " ".join(w for w in ["podman run --rm --log-driver=none", name, options, env, volumes] if w)


def exec_words(runtime: str, image: str, options: str, binds: list[str]) -> str:
    """The shell words that run what follows them inside the image (options: shell words already)."""
    if runtime == "podman":
        words = [_podman_run(options, binds, named=True), '--workdir="$PWD"', shlex.quote(image)]
    else:
        words = [f"{runtime} exec", options, " ".join(f"--bind {shlex.quote(p)}" for p in binds), shlex.quote(image)]
    return " ".join(w for w in words if w)


def setup_lines(runtime: str, image: str, options: str, binds: list[str]) -> str:
    """Shell lines before the command: the image's identity for the records, or a one-line stop.
    The image is named once, quoted, and only ever expanded as "$XFFL_CONTAINER_IMAGE" after that."""
    stop = []
    if runtime == "podman":
        # scancel signals this script's processes, but the container lives under podman's conmon, outside
        # them: the script (its command runs in the background, so the trap runs at once) stops the
        # container by name, which hands SIGTERM to the whole command through tini, and kills it after 15 s.
        stop = [
            "XFFL_CONTAINER_NAME=xffl-${SLURM_JOB_ID:-0}-$$",
            """trap 'podman stop --time 15 "$XFFL_CONTAINER_NAME" >/dev/null 2>&1; exit 143' TERM INT""",
        ]
        digest = (
            """XFFL_CONTAINER_DIGEST=$(podman image inspect --format '{{.Id}}' "$XFFL_CONTAINER_IMAGE" 2>/dev/null) || """
            '{ echo "xffl-cwl: image $XFFL_CONTAINER_IMAGE is not in the podman storage of $USER here; load it with '
            'podman load -i ARCHIVE (containers/README.md)" >&2; exit 2; }\n'
            "XFFL_CONTAINER_DIGEST=sha256:${XFFL_CONTAINER_DIGEST#sha256:}"
        )
    else:
        digest = (
            '[ -r "$XFFL_CONTAINER_IMAGE" ] || { echo "xffl-cwl: image $XFFL_CONTAINER_IMAGE cannot be read here; '
            'copy the .sif there (containers/README.md)" >&2; exit 2; }\n'
            'XFFL_CONTAINER_DIGEST=sha256:$(sha256sum <"$XFFL_CONTAINER_IMAGE" | cut -c1-64)'
        )
    return "\n".join(
        [
            f"export XFFL_CONTAINER_RUNTIME={runtime} XFFL_CONTAINER_IMAGE={shlex.quote(image)}",
            f"command -v {runtime} >/dev/null || "
            f'{{ echo "xffl-cwl: {runtime} is not found on $(hostname); load its module in setup" >&2; exit 2; }}',
            digest,
            *stop,
            "export XFFL_CONTAINER_DIGEST",
            "# Workers of a training on several nodes are started by srun, each in the container",
            f"export XFFL_WORKER_EXEC={worker_exec(runtime, image, options, binds)}",
        ]
    )


def worker_exec(runtime: str, image: str, options: str, binds: list[str]) -> str:
    """XFFL_WORKER_EXEC's value as a shell word: the same command, split later with shlex by the launcher,
    so it is quoted once more; the job's directory is expanded when the line runs."""
    if runtime != "podman":
        return shlex.quote(exec_words(runtime, image, options, binds))
    before = _podman_run(options, binds, named=False)
    return f'{shlex.quote(before)}" --workdir=$PWD "{shlex.quote(shlex.quote(image))}'


def container_variables(values: dict[str, Any], runtime: str, options: str) -> dict[str, str]:
    """`container_exec` and `container_setup` for a template's final values ("" when runtime is none)."""
    if runtime == "none":
        return {"container_exec": "", "container_setup": ""}
    image = str(values.get("container_image") or "")
    binds = [str(p) for p in values.get("container_bind_paths") or ()]
    return {
        "container_exec": exec_words(runtime, image, options, binds),
        "container_setup": setup_lines(runtime, image, options, binds),
    }

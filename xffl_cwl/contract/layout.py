"""The names a run folder and the tools agree on: files, steps, inputs, deployments, records.

The generator writes them, the run-folder reader, preflight and the supervisor look for them, the
tools write the records; nothing else spells them.
"""

from __future__ import annotations

import re

# The run folder
MAIN_CWL = "main.cwl"
ROUND_CWL = "round.cwl"
INPUTS_YML = "inputs.yml"
STREAMFLOW_YML = "streamflow.yml"
FEDERATION_SOURCE = "federation.source.yml"  # the federation.yml the folder was generated from, byte for byte
TOOLS_DIR = "tools"
TOOLS = ("train.cwl", "aggregate.cwl", "evaluate.cwl")
CUSTOM_TEMPLATES_DIR = "slurm"  # facilities' own SLURM templates, copied in
WORK_DIR = "work"  # work/<deployment>/: each local deployment's working directory
OUT_DIR = "out"  # the final outputs of `xffl-cwl run`
REPORT_DIR = "report"  # `xffl-cwl report`'s plots and page
TMP_DIR = "tmp"  # the runners' $TMPDIR
STREAMFLOW_LOG = "streamflow.log"
DATABASE = ".streamflow/sqlite.db"

# Inside the workflows
AGGREGATOR = "aggregator"  # the deployment of the aggregate, evaluate and baseline steps
BASELINE_STEP = "baseline"
LOOP_STEP = "federation"
AGGREGATE_STEP = "aggregate"
EVALUATE_STEP = "evaluate"
TRAIN_STEP_PREFIX = "train_"
DATASET_INPUT_PREFIX = "dataset_"
LOCAL_INPUT_PREFIX = "local_"  # round.cwl: a facility's copy of the previous global model, carried by the loop

# The StreamFlow plugin's deployment type
FACILITY_CONNECTOR = "xffl-facility"
# A job that records its own outcome names the file in this variable; the plugin then writes that
# record itself when SLURM ends the job (timeout, node failure, deadline), and reports success.
STATUS_FILE_ENV = "XFFL_STATUS_FILE"
WORKER_ENV = "XFFL_WORKER"  # set by `xffl-cwl train`'s launcher on its workers: this process is one of several
NNODES_ENV = "XFFL_NNODES"  # the nodes that training spans
WORKER_EXEC_ENV = "XFFL_WORKER_EXEC"  # set by a SLURM template: what srun runs each worker in (a container)
# Set by a SLURM template around a containerized job: the runtime, the image and its digest, for the records
CONTAINER_RUNTIME_ENV = "XFFL_CONTAINER_RUNTIME"
CONTAINER_IMAGE_ENV = "XFFL_CONTAINER_IMAGE"
CONTAINER_DIGEST_ENV = "XFFL_CONTAINER_DIGEST"
IMAGE_IDENTITY_FILE = "/etc/xffl-cwl/image.json"  # written into the image by containers/build.sh
DEADLINE_ENV = "XFFL_DEADLINE"  # seconds from a job's submission to its end, queue wait included

# State `xffl-cwl run` keeps in a run folder: the lock, the attempts, completed rounds, job journals
STATE_DIR_NAME = ".xffl"
RESUME_INPUTS = "inputs.resume.yml"
RESUME_STREAMFLOW = "streamflow.resume.yml"

# What the tools write
UPDATE_JSON = "update.json"
STATUS_SUFFIX = ".status.json"  # <facility>.status.json: how a train step's round ended (records.TrainStatus)
AGGREGATE_JSON = "aggregate.json"
HISTORY_JSONL = "history.jsonl"
STATE_DIR = "state"
TOOL_LOGS = {"train": "train.log", "aggregate": "aggregate.log", "evaluate": "evaluate.log"}


# A facility's name as the tools take it: it names the update directory (`--out`), so it is a safe
# file name; the aggregator knows each update by it. (federation.yml's names are stricter still.)
UPDATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def train_step_id(facility: str) -> str:
    return TRAIN_STEP_PREFIX + facility


def dataset_input_id(facility: str) -> str:
    return DATASET_INPUT_PREFIX + facility


def local_input_id(facility: str) -> str:
    return LOCAL_INPUT_PREFIX + facility


def status_file(facility: str) -> str:
    return facility + STATUS_SUFFIX


def local_workdir(deployment: str) -> str:
    """A local deployment's working directory, relative to the run folder so the folder can move."""
    return f"{WORK_DIR}/{deployment}"


def custom_template_path(facility: str) -> str:
    """Where a facility's own SLURM template is copied inside the run folder."""
    return f"{CUSTOM_TEMPLATES_DIR}/{facility}.sh"


def step_path(*steps: str) -> str:
    """StreamFlow's name of a (nested) step: /federation/train_lumi."""
    return "/" + "/".join(steps)


def tool_of_step(step: str) -> str:
    """Which tool a step path runs: train, aggregate or evaluate (the baseline evaluates)."""
    name = step.rstrip("/").rsplit("/", 1)[-1]
    if name.startswith(TRAIN_STEP_PREFIX):
        return "train"
    return "evaluate" if name == BASELINE_STEP else name

"""The federation as CWL objects: main.cwl (the loop over rounds) and round.cwl (one round).

Built with cwl-utils' object model. round.cwl holds one self-contained `train_<facility>` step
per facility, its settings written out as defaults, so adding a facility by hand is copying a
block; the aggregate step lists every update as a source (no JavaScript merge step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cwl_utils.parser.cwl_v1_2 as cwl

from xffl_cwl.contract.layout import (
    AGGREGATE_STEP,
    BASELINE_STEP,
    DATASET_INPUT_PREFIX,
    EVALUATE_STEP,
    LOOP_STEP,
    ROUND_CWL,
    TOOLS_DIR,
    dataset_input_id,
    local_input_id,
    train_step_id,
)
from xffl_cwl.contract.options import AggregateOptions, TrainOptions, tool_params, tool_values
from xffl_cwl.contract.params import Param
from xffl_cwl.contract.strategies import STRATEGIES
from xffl_cwl.facility.templates import load_template, nvidia_gpus, training_world
from xffl_cwl.federation.spec import FacilitySpec, FederationSpec, LocalDeployment

CWLTOOL_NAMESPACE = "http://commonwl.org/cwltool#"
TRAIN_OUTPUTS = ["update", "status", "local_model", "metrics", "log"]
# A train step runs unless the orchestrator left its facility out of this round (`NAME@ROUND: REASON`
# entries of `left_out`, which `xffl-cwl run` fills when it resumes without an unreachable facility).
PRESENT = (
    "function present(left_out, facility, round) {"
    " return left_out.every(function (entry) { return entry.split(':')[0] != facility + '@' + round; }); }"
)
CUDA_HINT = {"class": "cwltool:CUDARequirement", "cudaVersionMin": "11.8", "cudaComputeCapability": "7.0"}
STRATEGY_SETTINGS = frozenset(setting for s in STRATEGIES.values() for setting in s.uses)


def loading_options() -> cwl.LoadingOptions:
    from schema_salad.fetcher import DefaultFetcher

    # A fetcher without an HTTP session: emitting CWL never needs the network (or a cache dir).
    return cwl.LoadingOptions(fetcher=DefaultFetcher({}, None), namespaces={"cwltool": CWLTOOL_NAMESPACE})


def _cwl_value(p: Param, value: Any) -> Any:
    """A setting as its CWL input takes it: lists and pairs are comma-separated strings."""
    return ",".join(str(v) for v in value) if p.kind in ("names", "pair") else value


def _spelled_out(table: tuple[Param, ...], values: dict[str, Any], applies) -> dict[str, Any]:
    """The settings a step writes: those marked `always`, and the others when not the tool's default."""
    return {
        p.name: _cwl_value(p, values[p.name])
        for p in table
        if applies(p) and (p.always or values[p.name] != p.default) and values[p.name] is not None
    }


def _training_defaults(t: TrainOptions) -> dict[str, Any]:
    return _spelled_out(
        tool_params(TrainOptions), tool_values(t), lambda p: t.mode == "lora" or not p.name.startswith("lora_")
    )


def _aggregation_defaults(a: AggregateOptions, mode: str) -> dict[str, Any]:
    used = STRATEGIES[a.strategy].uses

    def applies(p: Param) -> bool:
        if p.name in STRATEGY_SETTINGS:
            return p.name in used
        return mode == "lora" or p.name != "lora_merge"

    return _spelled_out(tool_params(AggregateOptions), tool_values(a), applies)


def nvidia_gpus_of(facility: FacilitySpec) -> int:
    """The NVIDIA GPUs a facility's train job gets: declared for a local one, from the template for SLURM."""
    deployment = facility.deployment
    if isinstance(deployment, LocalDeployment):
        return deployment.gpus
    template = load_template(deployment.facility.template, Path("."))
    return nvidia_gpus(template, deployment.facility.sbatch)


def training_world_of(facility: FacilitySpec) -> tuple[int, int]:
    """(nodes, workers per node) of a facility's training: declared for a local one, from the template for SLURM."""
    deployment = facility.deployment
    if isinstance(deployment, LocalDeployment):
        return 1, deployment.workers or max(1, deployment.gpus)
    template = load_template(deployment.facility.template, Path("."))
    return training_world(template, deployment.facility.sbatch)


def _weight_limits(spec: FederationSpec) -> dict[str, list[str]]:
    """What each facility may weigh, from federation.yml: fixed weights, else what it can train in a round.

    With local_steps a facility trains at most local_steps x batch_size x workers x grad_accum
    sequences (x seq_len tokens); an update that declares more counts that much. With epochs the workflow cannot
    know the data's size, so the declared counts stand unless federation.yml sets weights.
    """
    if any(f.weight is not None for f in spec.facilities):
        return {"weights": [f"{f.name}={f.weight:g}" for f in spec.facilities]}
    if spec.aggregation.weighting == "uniform":
        return {}
    caps = []
    for f in spec.facilities:
        t = f.training
        if t.local_steps is not None:
            nodes, per_node = training_world_of(f)
            cap = (
                t.local_steps
                * t.batch_size
                * nodes
                * per_node
                * t.grad_accum
                * (t.seq_len if spec.aggregation.weighting == "tokens" else 1)
            )
            caps.append(f"{f.name}={cap}")
    return {"max_weights": caps} if caps else {}


def _train_step(facility: FacilitySpec, lo: cwl.LoadingOptions) -> cwl.WorkflowStep:
    inputs = [
        # the facility's own copy of the previous global model, if it has one, plus the round's change;
        # else the global model itself (first round, or back from a round it missed)
        cwl.WorkflowStepInput(
            id="model", source=[local_input_id(facility.name), "model"], pickValue="first_non_null", loadingOptions=lo
        ),
        cwl.WorkflowStepInput(id="change", source="change", loadingOptions=lo),
        cwl.WorkflowStepInput(id="dataset", source=dataset_input_id(facility.name), loadingOptions=lo),
        cwl.WorkflowStepInput(id="facility", default=facility.name, loadingOptions=lo),
        cwl.WorkflowStepInput(id="round", source="round", loadingOptions=lo),
        cwl.WorkflowStepInput(id="left_out", source="left_out", loadingOptions=lo),
    ]
    if facility.deadline is not None:
        inputs.append(cwl.WorkflowStepInput(id="deadline", default=facility.deadline, loadingOptions=lo))
    nodes, per_node = training_world_of(facility)
    for name, value in (("nnodes", nodes), ("nproc_per_node", per_node)):
        if value != 1:
            inputs.append(cwl.WorkflowStepInput(id=name, default=value, loadingOptions=lo))
    inputs += [
        cwl.WorkflowStepInput(id=k, default=v, loadingOptions=lo)
        for k, v in _training_defaults(facility.training).items()
    ]
    gpus = nvidia_gpus_of(facility)
    hints = [dict(CUDA_HINT, cudaDeviceCountMin=gpus)] if gpus else None
    return cwl.WorkflowStep(
        id=train_step_id(facility.name),
        label=f"Local training at {facility.name}",
        run=f"{TOOLS_DIR}/train.cwl",
        in_=inputs,
        out=TRAIN_OUTPUTS,
        hints=hints,
        when="$(present(inputs.left_out, inputs.facility, inputs.round))",
        loadingOptions=lo,
    )


def build_round(spec: FederationSpec) -> cwl.Workflow:
    lo = loading_options()
    facility_inputs = [
        cwl.WorkflowInputParameter(
            id=dataset_input_id(f.name), type_=["File", "Directory"], label=f"Dataset of {f.name}", loadingOptions=lo
        )
        for f in spec.facilities
    ]
    local_inputs = [
        cwl.WorkflowInputParameter(
            id=local_input_id(f.name),
            type_=["null", "Directory"],
            label=f"{f.name}'s copy of the previous global model (kept there)",
            loadingOptions=lo,
        )
        for f in spec.facilities
    ]
    local_outputs = [
        cwl.WorkflowOutputParameter(
            id=f"new_{local_input_id(f.name)}",
            type_=["null", "Directory"],
            outputSource=f"{train_step_id(f.name)}/local_model",
            loadingOptions=lo,
        )
        for f in spec.facilities
    ]
    aggregate_inputs = [
        cwl.WorkflowStepInput(id="global_model", source="model", loadingOptions=lo),
        cwl.WorkflowStepInput(
            id="updates",
            source=[f"{train_step_id(f.name)}/update" for f in spec.facilities],
            linkMerge="merge_flattened",
            pickValue="all_non_null",
            loadingOptions=lo,
        ),
        cwl.WorkflowStepInput(
            id="statuses",
            source=[f"{train_step_id(f.name)}/status" for f in spec.facilities],
            linkMerge="merge_flattened",
            pickValue="all_non_null",
            loadingOptions=lo,
        ),
        cwl.WorkflowStepInput(id="left_out", source="left_out", loadingOptions=lo),
        cwl.WorkflowStepInput(id="state", source="state", loadingOptions=lo),
        cwl.WorkflowStepInput(id="round", source="round", loadingOptions=lo),
    ] + [
        cwl.WorkflowStepInput(id=k, default=v, loadingOptions=lo)
        for k, v in (_weight_limits(spec) | _aggregation_defaults(spec.aggregation, spec.training.mode)).items()
    ]
    evaluate_inputs = [
        cwl.WorkflowStepInput(id="model", source=f"{AGGREGATE_STEP}/model", loadingOptions=lo),
        cwl.WorkflowStepInput(id="dataset", source="test_set", loadingOptions=lo),
        cwl.WorkflowStepInput(id="previous_history", source="history", loadingOptions=lo),
        cwl.WorkflowStepInput(id="seq_len", default=spec.training.seq_len, loadingOptions=lo),
        cwl.WorkflowStepInput(id="batch_size", default=spec.eval_batch_size, loadingOptions=lo),
    ]
    return cwl.Workflow(
        id="round",
        cwlVersion="v1.2",
        label=f"One round of federation {spec.name}",
        doc=(
            "Every facility fine-tunes the global model on its own data (train_<facility>), the aggregator merges\n"
            "their updates into the next global model (aggregate) and evaluate appends the round to the history.\n"
            "A facility whose training fails still ends its step, with a status and no update: aggregate leaves\n"
            "it out of the round (pickValue: all_non_null) and it rejoins the next one.\n"
            "Each facility keeps its copy of the global model (local_<facility>, carried by the loop, so it stays\n"
            "where it is) and is sent only the round's change; one without a copy gets the whole model.\n"
            "To add a facility: copy a train_<facility> block, add its dataset_<facility> input here and in\n"
            "main.cwl, and its update and status to aggregate's sources (see the README)."
        ),
        requirements=[
            cwl.MultipleInputFeatureRequirement(loadingOptions=lo),
            cwl.InlineJavascriptRequirement(expressionLib=[PRESENT], loadingOptions=lo),
        ],
        inputs=[
            cwl.WorkflowInputParameter(
                id="model", type_="Directory", label="Global model of this round", loadingOptions=lo
            ),
            cwl.WorkflowInputParameter(
                id="state", type_=["null", "Directory"], label="Server-optimizer state", loadingOptions=lo
            ),
            cwl.WorkflowInputParameter(
                id="change",
                type_=["null", "Directory"],
                label="Change of the global model in the previous round",
                loadingOptions=lo,
            ),
            cwl.WorkflowInputParameter(id="round", type_="int", label="Round number", loadingOptions=lo),
            cwl.WorkflowInputParameter(id="history", type_="File", label="History so far", loadingOptions=lo),
            cwl.WorkflowInputParameter(
                id="test_set", type_=["null", "File", "Directory"], label="Held-out test set", loadingOptions=lo
            ),
            cwl.WorkflowInputParameter(
                id="left_out",
                type_="string[]",
                label="Facilities left out of a round (NAME@ROUND: REASON)",
                loadingOptions=lo,
            ),
            *facility_inputs,
            *local_inputs,
        ],
        outputs=[
            cwl.WorkflowOutputParameter(
                id="new_model", type_="Directory", outputSource=f"{AGGREGATE_STEP}/model", loadingOptions=lo
            ),
            cwl.WorkflowOutputParameter(
                id="new_state", type_=["null", "Directory"], outputSource=f"{AGGREGATE_STEP}/state", loadingOptions=lo
            ),
            cwl.WorkflowOutputParameter(
                id="new_history", type_="File", outputSource=f"{EVALUATE_STEP}/history", loadingOptions=lo
            ),
            cwl.WorkflowOutputParameter(
                id="new_change", type_="Directory", outputSource=f"{AGGREGATE_STEP}/change", loadingOptions=lo
            ),
            *local_outputs,
        ],
        steps=[
            *(_train_step(f, lo) for f in spec.facilities),
            cwl.WorkflowStep(
                id=AGGREGATE_STEP,
                label="Merge the updates",
                run=f"{TOOLS_DIR}/aggregate.cwl",
                in_=aggregate_inputs,
                out=["model", "state", "change", "metrics", "log"],
                loadingOptions=lo,
            ),
            cwl.WorkflowStep(
                id=EVALUATE_STEP,
                label="Record the round",
                run=f"{TOOLS_DIR}/evaluate.cwl",
                in_=evaluate_inputs,
                out=["history", "log"],
                loadingOptions=lo,
            ),
        ],
        loadingOptions=lo,
    )


def build_main(spec: FederationSpec) -> cwl.Workflow:
    lo = loading_options()
    datasets = [dataset_input_id(f.name) for f in spec.facilities]
    loop = cwl.Loop(
        loopWhen="$(inputs.round <= inputs.rounds)",
        loop=[
            cwl.LoopInput(id="model", loopSource="new_model", loadingOptions=lo),
            cwl.LoopInput(id="state", loopSource="new_state", loadingOptions=lo),
            cwl.LoopInput(id="history", loopSource="new_history", loadingOptions=lo),
            cwl.LoopInput(id="round", valueFrom="$(inputs.round + 1)", loadingOptions=lo),
            cwl.LoopInput(id="change", loopSource="new_change", loadingOptions=lo),
            *(
                cwl.LoopInput(id=local_input_id(f.name), loopSource=f"new_{local_input_id(f.name)}", loadingOptions=lo)
                for f in spec.facilities
            ),
        ],
        outputMethod="last",
        loadingOptions=lo,
    )
    federation_inputs = [
        cwl.WorkflowStepInput(id="model", source="model", loadingOptions=lo),
        cwl.WorkflowStepInput(id="state", source="state", loadingOptions=lo),
        cwl.WorkflowStepInput(id="round", source="first_round", loadingOptions=lo),
        cwl.WorkflowStepInput(id="rounds", source="rounds", loadingOptions=lo),
        cwl.WorkflowStepInput(
            id="history", source=["history", f"{BASELINE_STEP}/history"], pickValue="first_non_null", loadingOptions=lo
        ),
        cwl.WorkflowStepInput(id="test_set", source="test_set", loadingOptions=lo),
        cwl.WorkflowStepInput(id="left_out", source="left_out", loadingOptions=lo),
        *(cwl.WorkflowStepInput(id=d, source=d, loadingOptions=lo) for d in datasets),
        # none before the first round: the loop carries them from each round to the next
        cwl.WorkflowStepInput(id="change", valueFrom="$(null)", loadingOptions=lo),
        *(
            cwl.WorkflowStepInput(id=local_input_id(f.name), valueFrom="$(null)", loadingOptions=lo)
            for f in spec.facilities
        ),
    ]
    baseline_inputs = [
        cwl.WorkflowStepInput(id="history", source="history", loadingOptions=lo),
        cwl.WorkflowStepInput(id="model", source="model", loadingOptions=lo),
        cwl.WorkflowStepInput(id="dataset", source="test_set", loadingOptions=lo),
        cwl.WorkflowStepInput(id="round", source="first_round", valueFrom="$(self - 1)", loadingOptions=lo),
        cwl.WorkflowStepInput(id="seq_len", default=spec.training.seq_len, loadingOptions=lo),
        cwl.WorkflowStepInput(id="batch_size", default=spec.eval_batch_size, loadingOptions=lo),
    ]
    return cwl.Workflow(
        id="main",
        cwlVersion="v1.2",
        label=f"Federation {spec.name}",
        doc=(
            f"Federated fine-tuning across {', '.join(f.name for f in spec.facilities)}.\n"
            "baseline records the initial model, then round.cwl runs once per round under cwltool:Loop,\n"
            "carrying the global model, the server-optimizer state, the round number and the history, and\n"
            "the round's change and each facility's copy of the model, which stays at that facility.\n"
            "To resume, set first_round, model, state and history (xffl-cwl run --resume does it): baseline is then skipped."
        ),
        requirements=[
            cwl.SubworkflowFeatureRequirement(loadingOptions=lo),
            cwl.MultipleInputFeatureRequirement(loadingOptions=lo),
            cwl.InlineJavascriptRequirement(loadingOptions=lo),
            cwl.StepInputExpressionRequirement(loadingOptions=lo),
        ],
        inputs=[
            cwl.WorkflowInputParameter(id="model", type_="Directory", label="Initial global model", loadingOptions=lo),
            cwl.WorkflowInputParameter(id="rounds", type_="int", label="Number of the last round", loadingOptions=lo),
            cwl.WorkflowInputParameter(
                id="first_round",
                type_="int",
                default=1,
                label="Number of the first round (above 1 to resume)",
                loadingOptions=lo,
            ),
            cwl.WorkflowInputParameter(
                id="state",
                type_=["null", "Directory"],
                label="Server-optimizer state to resume from",
                loadingOptions=lo,
            ),
            cwl.WorkflowInputParameter(
                id="history",
                type_=["null", "File"],
                label="History of the rounds before first_round (when resuming)",
                loadingOptions=lo,
            ),
            cwl.WorkflowInputParameter(
                id="test_set", type_=["null", "File", "Directory"], label="Held-out test set", loadingOptions=lo
            ),
            cwl.WorkflowInputParameter(
                id="left_out",
                type_="string[]",
                default=[],
                label="Facilities left out of a round (NAME@ROUND: REASON)",
                loadingOptions=lo,
            ),
            *(
                cwl.WorkflowInputParameter(
                    id=d,
                    type_=["File", "Directory"],
                    label=f"Dataset of {d[len(DATASET_INPUT_PREFIX) :]}",
                    loadingOptions=lo,
                )
                for d in datasets
            ),
        ],
        outputs=[
            cwl.WorkflowOutputParameter(
                id="final_model", type_="Directory", outputSource=f"{LOOP_STEP}/new_model", loadingOptions=lo
            ),
            cwl.WorkflowOutputParameter(
                id="final_state", type_=["null", "Directory"], outputSource=f"{LOOP_STEP}/new_state", loadingOptions=lo
            ),
            cwl.WorkflowOutputParameter(
                id="history", type_="File", outputSource=f"{LOOP_STEP}/new_history", loadingOptions=lo
            ),
        ],
        steps=[
            cwl.WorkflowStep(
                id=BASELINE_STEP,
                label="Record the initial model",
                run=f"{TOOLS_DIR}/evaluate.cwl",
                in_=baseline_inputs,
                out=["history"],
                when="$(inputs.history === null)",
                loadingOptions=lo,
            ),
            cwl.WorkflowStep(
                id=LOOP_STEP,
                label="The federated rounds",
                run=ROUND_CWL,
                in_=federation_inputs,
                out=[
                    "new_model",
                    "new_state",
                    "new_history",
                    "new_change",
                    *(f"new_{local_input_id(f.name)}" for f in spec.facilities),
                ],
                requirements=[loop],
                loadingOptions=lo,
            ),
        ],
        loadingOptions=lo,
    )

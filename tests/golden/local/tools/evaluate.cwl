#!/usr/bin/env cwl-runner
cwlVersion: v1.2
class: CommandLineTool
label: xffl-cwl evaluate
doc: |
  Records one round of a federation: the held-out loss of a model on a test set (when given) and
  the aggregator's per-facility summary (when the model has aggregate.json), as one JSON line
  appended to a copy of the history so far.
baseCommand: [xffl-cwl, evaluate]
arguments:
  - {prefix: --out, valueFrom: history.jsonl}
requirements:
  EnvVarRequirement:
    envDef:
      HF_HUB_OFFLINE: "1"
      TRANSFORMERS_OFFLINE: "1"
      HF_DATASETS_OFFLINE: "1"
      HF_HOME: $(runtime.tmpdir)/hf-home
      XDG_CACHE_HOME: $(runtime.tmpdir)/cache
      TOKENIZERS_PARALLELISM: "false"
  NetworkAccess:
    networkAccess: false
hints:
  # The image containers/build.sh makes (podman); elsewhere `podman load -i xffl-cwl-0.1.0.tar` or
  # `docker load -i ...` first, or --no-container with xffl-cwl installed (containers/README.md).
  DockerRequirement:
    dockerPull: localhost/xffl-cwl:0.1.0
  ResourceRequirement:
    coresMin: 1
    ramMin: 2048
stderr: evaluate.log
inputs:
  model:
    type: Directory
    label: Model
    doc: A global model directory (the initial one, or an aggregated one).
    inputBinding: {prefix: --model}
  dataset:
    type: ["null", File, Directory]
    label: Test set
    doc: Held-out data; without it only the aggregator's summary is recorded.
    inputBinding: {prefix: --dataset}
  previous_history:
    type: File?
    label: History so far
    doc: JSONL history of earlier rounds, copied before the new line.
    inputBinding: {prefix: --history}
  round:
    type: int?
    label: Round number
    doc: Default is the round in aggregate.json, else 0.
    inputBinding: {prefix: --round}
  seq_len:
    type: int?
    label: Sequence length
    inputBinding: {prefix: --seq-len}
  batch_size:
    type: int?
    label: Batch size
    inputBinding: {prefix: --batch-size}
  text_field:
    type: string?
    label: Text field
    inputBinding: {prefix: --text-field}
outputs:
  history:
    type: File
    label: History
    doc: The history with this round's line appended.
    outputBinding: {glob: history.jsonl}
  log:
    type: File
    label: Evaluation log
    outputBinding: {glob: evaluate.log}

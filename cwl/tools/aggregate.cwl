#!/usr/bin/env cwl-runner
cwlVersion: v1.2
class: CommandLineTool
label: xffl-cwl aggregate
doc: |
  Validates the facilities' updates (untrusted: sizes, file types, headers, names, shapes, dtypes,
  finite values, base fingerprint, round, identity) and streams the next global model to disk in
  bounded memory; a bad update is left out, never the round. FedAvg or a FedOpt server
  optimizer (fedavgm, fedadam, fedyogi, nesterov) whose state is carried from round to round.
  LoRA updates are merged exactly (mean of B_i A_i into the base weights) or FedIT-style.
  Beside the model it writes the round's change, which facilities apply to the copy they keep.
baseCommand: [xffl-cwl, aggregate]
arguments:
  - {prefix: --out, valueFrom: model}
  - {prefix: --state-out, valueFrom: state}
  - {prefix: --change-out, valueFrom: change}
requirements:
  EnvVarRequirement:
    envDef:
      HF_HUB_OFFLINE: "1"
      XDG_CACHE_HOME: $(runtime.tmpdir)/cache
  NetworkAccess:
    networkAccess: false
hints:
  # The image containers/build.sh makes (podman); elsewhere `podman load -i xffl-cwl-0.1.0.tar` or
  # `docker load -i ...` first, or --no-container with xffl-cwl installed (containers/README.md).
  DockerRequirement:
    dockerPull: localhost/xffl-cwl:0.1.0
  ResourceRequirement:
    coresMin: 1
    ramMin: 1024
stderr: aggregate.log
inputs:
  global_model:
    type: Directory
    label: Current global model
    doc: The model every update was trained from.
    inputBinding: {prefix: --global}
  updates:
    type:
      type: array
      items: Directory
      inputBinding: {prefix: --update}
    label: Updates
    doc: |
      One update directory per facility, named after it (xffl-cwl train's outputs are); every byte
      of them is untrusted and checked before it is used.
    inputBinding: {position: 1}
  max_weights:
    type:
      type: array
      items: string
      inputBinding: {prefix: --max-weight}
    default: []
    label: Weight caps
    doc: |
      NAME=N per facility: the most samples (or tokens) it may count, from the workflow's settings
      (local steps x batch size x accumulation), never from the update itself.
    inputBinding: {position: 2}
  statuses:
    type:
      type: array
      items: File
      inputBinding: {prefix: --status}
    default: []
    label: Round statuses
    doc: |
      Each train step's <facility>.status.json: a facility whose round did not end ok (its training
      failed, ran past the deadline, its job was lost) is left out of the round, and aggregate.json
      says why.
    inputBinding: {position: 4}
  left_out:
    type:
      type: array
      items: string
      inputBinding: {prefix: --left-out}
    default: []
    label: Left out by the orchestrator
    doc: "NAME@ROUND: REASON entries; those for this round are left out (xffl-cwl run fills them when it resumes a run without a facility it could not reach)."
    inputBinding: {position: 5}
  weights:
    type:
      type: array
      items: string
      inputBinding: {prefix: --weight}
    default: []
    label: Fixed weights
    doc: NAME=W per facility, set in federation.yml; when given, every merged facility needs one.
    inputBinding: {position: 3}
  state:
    type: Directory?
    label: Server-optimizer state
    doc: The state output of the previous round; none in the first round.
    inputBinding: {prefix: --state}
  round:
    type: int?
    label: Round number
    doc: Updates for any other round are rejected.
    inputBinding: {prefix: --round}
  strategy:
    type:
      type: enum
      symbols: [fedavg, fedavgm, fedadam, fedyogi, nesterov]
    default: fedavg
    label: Strategy
    doc: Server optimizer.
    inputBinding: {prefix: --strategy}
  server_lr:
    type: float?
    label: Server learning rate
    doc: Default fedavg/fedavgm 1.0, fedadam/fedyogi 0.01, nesterov 0.7.
    inputBinding: {prefix: --server-lr}
  momentum:
    type: float?
    label: Server momentum
    doc: fedavgm and nesterov (default 0.9).
    inputBinding: {prefix: --momentum}
  betas:
    type: string?
    label: Adam betas
    doc: fedadam and fedyogi, as "b1,b2" (default 0.9,0.99).
    inputBinding: {prefix: --betas}
  tau:
    type: float?
    label: Adaptivity
    doc: fedadam and fedyogi (default 1e-3).
    inputBinding: {prefix: --tau}
  min_updates:
    type: int?
    label: Minimum valid updates
    doc: Fewer valid updates fail the step (default 1).
    inputBinding: {prefix: --min-updates}
  lora_merge:
    type:
      type: enum
      symbols: [exact, fedit]
    default: exact
    label: LoRA merge
    doc: exact (mean of B_i A_i merged into the base) or fedit (average A and B); used for LoRA updates only.
    inputBinding: {prefix: --lora-merge}
  weighting:
    type:
      type: enum
      symbols: [samples, tokens, uniform]
    default: samples
    label: Weighting
    doc: How updates are weighted.
    inputBinding: {prefix: --weighting}
  merge:
    type:
      type: enum
      symbols: [mean, trimmed_mean, median]
    default: mean
    label: Combination rule
    doc: mean (weighted), or the coordinate-wise median or trimmed_mean (unweighted), which one member with absurd values cannot drag away.
    inputBinding: {prefix: --merge}
  trim:
    type: float?
    label: Trimmed share
    doc: "trimmed_mean: share of the members dropped at each end, at least one when three or more (default 0.2)."
    inputBinding: {prefix: --trim}
  downlink:
    type:
      type: enum
      symbols: [fp32, bf16, int8]
    default: fp32
    label: Change encoding
    doc: "How the round's change of the global model is sent to the facilities, which keep the previous one: fp32 (exact), bf16, or int8 with per-block scales; the lossy ones keep what was not sent for the next round (error feedback). Full and exact-LoRA federations; FedIT sends its adapter."
    inputBinding: {prefix: --downlink}
  norm_clip:
    type: float?
    label: Norm clipping
    doc: "Scale down every update whose change is larger (L2) than norm_clip times the round's median change; unset: no clipping."
    inputBinding: {prefix: --norm-clip}
outputs:
  model:
    type: Directory
    label: Next global model
    doc: A Hugging Face model directory with aggregate.json.
    outputBinding: {glob: model}
  state:
    type: Directory?
    label: Server-optimizer state
    doc: Present for stateful strategies; pass it to the next round.
    outputBinding: {glob: state}
  change:
    type: Directory
    label: Change of the global model
    doc: |
      What a facility holding the previous global model needs to rebuild this one (train's change
      input): the encoded change of every weight that moved, or FedIT's new adapter.
    outputBinding: {glob: change}
  metrics:
    type: File
    label: Aggregation metrics
    doc: aggregate.json of the new model.
    outputBinding: {glob: model/aggregate.json}
  log:
    type: File
    label: Aggregation log
    outputBinding: {glob: aggregate.log}

#!/usr/bin/env cwl-runner
cwlVersion: v1.2
class: CommandLineTool
label: xffl-cwl train
doc: |
  One facility's local round of federated fine-tuning: loads the global model (a Hugging Face
  causal-LM directory) offline, trains it on the facility's data and writes the update: full
  weights in the global model's exact layout (--mode full) or a PEFT adapter (--mode lora), with
  update.json (samples, tokens, losses, timings, fingerprint of the global model).

  The step succeeds even when the training does not: <facility>.status.json says how the round ended (ok,
  failed, deadline, lost, with the reason) and `update` is then absent, so a federation leaves the
  facility out of that round instead of stopping. The xffl-facility StreamFlow plugin writes the
  same record when SLURM ends the job (time limit, node failure, the deadline).

  Data stays where it lives: with `change` (the aggregate step's change output), `model` is this
  facility's own copy of the previous global model and the round's model is rebuilt from the two,
  bit for bit (its fingerprint is checked); `local_model` is the copy to keep for the next round.
  Without `change`, `model` is the round's global model itself (the first round, or a facility
  that has no copy).

  Several workers (nnodes x nproc_per_node > 1): the model is sharded over them with PyTorch FSDP2;
  inside a SLURM allocation srun starts them, elsewhere they are local processes; only the first
  writes the update, in the same format. A worker that dies stops the others and the status names it.

  GPUs: add `cwltool:CUDARequirement` as a hint on the *step* that runs this tool where the
  facility has GPUs (the generated round.cwl does so for GPU facilities). It is not a hint of the
  tool itself because cwltool treats that hint as mandatory and fails on CPU-only machines.
$namespaces:
  cwltool: http://commonwl.org/cwltool#
baseCommand: [xffl-cwl, train]
arguments:
  - {prefix: --out, valueFrom: $(inputs.facility)}
  - {prefix: --local-out, valueFrom: model.local}
  - --no-progress
requirements:
  InlineJavascriptRequirement: {}
  EnvVarRequirement:
    envDef:
      HF_HUB_OFFLINE: "1"
      TRANSFORMERS_OFFLINE: "1"
      HF_DATASETS_OFFLINE: "1"
      HF_HOME: $(runtime.tmpdir)/hf-home
      XDG_CACHE_HOME: $(runtime.tmpdir)/cache
      TOKENIZERS_PARALLELISM: "false"
      XFFL_STATUS_FILE: $(inputs.facility).status.json
      XFFL_DEADLINE: $(String(inputs.deadline))
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
stderr: train.log
inputs:
  model:
    type: Directory
    label: Global model
    doc: |
      Hugging Face causal-LM directory (config, tokenizer, safetensors); a FedIT model also holds adapter/.
      With `change`: this facility's copy of the previous global model (its local_model output).
    inputBinding: {prefix: --model}
  change:
    type: Directory?
    label: Change of the global model
    doc: The aggregate step's change output; absent in the first round.
    inputBinding: {prefix: --change}
  dataset:
    type: [File, Directory]
    label: Local dataset
    doc: A datasets.save_to_disk directory, a JSONL or text file, or a folder of them.
    inputBinding: {prefix: --dataset}
  facility:
    type: string
    label: Facility name
    doc: |
      Names the update directory and is recorded in update.json; the aggregator knows each update by
      its directory's name and refuses one whose update.json claims another. Letters, digits, _ and -.
    inputBinding: {prefix: --facility}
  round:
    type: int
    label: Round number
    doc: The federated round this update belongs to (1 for the first).
    inputBinding: {prefix: --round}
  deadline:
    type: int
    default: 0
    label: Deadline (seconds)
    doc: |
      Time from the job's submission to its end, queue wait included, after which the training is
      stopped and the facility left out of the round (0: none). On SLURM the plugin cancels the job.
  local_steps:
    type: int?
    label: Local optimizer steps
    doc: Steps this round; default one epoch. Exclusive with epochs.
    inputBinding: {prefix: --local-steps}
  epochs:
    type: float?
    label: Local epochs
    doc: Epochs over the local data instead of local_steps.
    inputBinding: {prefix: --epochs}
  batch_size:
    type: int?
    label: Micro-batch size
    doc: Sequences per micro-batch (default 8).
    inputBinding: {prefix: --batch-size}
  grad_accum:
    type: int?
    label: Gradient accumulation
    doc: Micro-batches per optimizer step (default 1).
    inputBinding: {prefix: --grad-accum}
  lr:
    type: float?
    label: Learning rate
    doc: Peak AdamW learning rate (default 1e-4).
    inputBinding: {prefix: --lr}
  warmup_steps:
    type: int?
    label: Warm-up steps
    doc: Linear warm-up before cosine decay (default 10% of the steps).
    inputBinding: {prefix: --warmup-steps}
  weight_decay:
    type: float?
    label: Weight decay
    doc: AdamW weight decay (default 0).
    inputBinding: {prefix: --weight-decay}
  max_grad_norm:
    type: float?
    label: Gradient clipping norm
    doc: Global gradient norm limit (default 1.0).
    inputBinding: {prefix: --max-grad-norm}
  seq_len:
    type: int?
    label: Sequence length
    doc: Tokens per training sequence (default 512).
    inputBinding: {prefix: --seq-len}
  seed:
    type: int?
    label: Seed
    doc: Seeds the held-out split and, with the round and facility, the data order (default 0).
    inputBinding: {prefix: --seed}
  mode:
    type:
      type: enum
      symbols: [full, lora]
    default: full
    label: Fine-tuning mode
    doc: full (all weights) or lora (a PEFT adapter).
    inputBinding: {prefix: --mode}
  lora_r:
    type: int?
    label: LoRA rank
    inputBinding: {prefix: --lora-r}
  lora_alpha:
    type: float?
    label: LoRA alpha
    inputBinding: {prefix: --lora-alpha}
  lora_targets:
    type: string?
    label: LoRA target modules
    doc: Comma-separated module names, e.g. q_proj,v_proj.
    inputBinding: {prefix: --lora-targets}
  lora_dropout:
    type: float?
    label: LoRA dropout
    inputBinding: {prefix: --lora-dropout}
  precision:
    type:
      type: enum
      symbols: [fp32, bf16]
    default: fp32
    label: Training precision
    doc: fp32, or bf16 mixed precision with fp32 master weights.
    inputBinding: {prefix: --precision}
  sharding:
    type:
      type: enum
      symbols: [auto, full, hybrid]
    default: auto
    label: Sharding across workers
    doc: 'With several workers: full (FSDP: parameters, gradients and optimizer state sharded over all of them), hybrid (HSDP: sharded inside a node, replicated across nodes) or auto (hybrid on several nodes, else full).'
    inputBinding: {prefix: --sharding}
  activation_checkpointing:
    type: boolean?
    label: Activation checkpointing
    doc: Recompute each decoder layer's activations in the backward pass.
    inputBinding: {prefix: --activation-checkpointing}
  backend:
    type:
      type: enum
      symbols: [auto, nccl, gloo]
    default: auto
    label: Communication backend
    doc: auto (NCCL on GPUs, RCCL on AMD through the same name, gloo on CPU), nccl or gloo.
    inputBinding: {prefix: --backend}
  nnodes:
    type: int
    default: 1
    label: Nodes
    doc: |
      Nodes the training spans; inside a SLURM allocation srun starts the workers (the generated
      round.cwl sets it from the facility's `nodes`).
    inputBinding: {prefix: --nnodes}
  nproc_per_node:
    type: int
    default: 1
    label: Workers per node
    doc: |
      Training processes per node, one per GPU (on CPU, processes sharing the node); with more than
      one in all, the model is sharded across them (FSDP2) and only the first writes the update.
    inputBinding: {prefix: --nproc-per-node}
  eval_fraction:
    type: float?
    label: Held-out share
    doc: Share of the local data held out for the before/after loss (default 0.1).
    inputBinding: {prefix: --eval-fraction}
  text_field:
    type: string?
    label: Text field
    doc: Column or JSON key holding the text (default text).
    inputBinding: {prefix: --text-field}
  uplink:
    type:
      type: enum
      symbols: [fp32, bf16, int8]
    default: fp32
    label: Update encoding
    doc: "Full mode: fp32 sends the new weights; bf16, or int8 with per-block scales, sends their change, and the facility keeps what was not sent for its next update (error feedback)."
    inputBinding: {prefix: --uplink}
outputs:
  update:
    type: Directory?
    label: Update
    doc: Full weights (model directory) or a PEFT adapter, with update.json, in a directory named after the facility.
    outputBinding: {glob: $(inputs.facility)}
  local_model:
    type: Directory?
    label: This facility's copy of the global model
    doc: The model this round trained from (hard links where possible); pass it as `model` with the next round's change.
    outputBinding: {glob: model.local}
  metrics:
    type: File?
    label: Update metrics
    doc: update.json of the update.
    outputBinding: {glob: $(inputs.facility)/update.json}
  status:
    type: File
    label: Round status
    doc: <facility>.status.json, how the facility's round ended (ok, failed, deadline, lost) and why.
    outputBinding: {glob: $(inputs.facility).status.json}
  log:
    type: File?
    label: Training log
    doc: The trainer's stderr; absent when the job never ran (cancelled in the queue at its deadline, node lost).
    outputBinding: {glob: train.log}

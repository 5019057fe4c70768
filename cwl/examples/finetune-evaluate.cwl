#!/usr/bin/env cwl-runner
cwlVersion: v1.2
class: Workflow
label: Fine-tune, then evaluate
doc: |
  Not a federation: one site fine-tunes a model on its dataset with the xffl-cwl train tool and
  measures the held-out loss before and after with the evaluate tool. It shows that the tools
  stand on their own in any CWL pipeline.
inputs:
  model:
    type: Directory
    label: Model to fine-tune (Hugging Face directory)
  dataset:
    type: [File, Directory]
    label: Training data
  test_set:
    type: [File, Directory]
    label: Held-out data
  steps:
    type: int
    label: Optimizer steps
    default: 50
  seq_len:
    type: int
    label: Sequence length
    default: 512
outputs:
  finetuned:
    type: Directory
    outputSource: [finetune/update]
    pickValue: the_only_non_null
  report:
    type: File
    doc: Two JSON lines, the held-out loss before (round 0) and after (round 1).
    outputSource: after/history
steps:
  before:
    run: ../tools/evaluate.cwl
    in:
      model: model
      dataset: test_set
      round: {default: 0}
      seq_len: seq_len
    out: [history]
  finetune:
    run: ../tools/train.cwl
    in:
      model: model
      dataset: dataset
      facility: {default: single-site}
      round: {default: 1}
      local_steps: steps
      seq_len: seq_len
      lr: {default: 0.003}
    out: [update]
  after:
    run: ../tools/evaluate.cwl
    in:
      model:
        source: [finetune/update]
        pickValue: the_only_non_null  # the training failed: this step (and the pipeline) fails too
      dataset: test_set
      previous_history: before/history
      round: {default: 1}
      seq_len: seq_len
    out: [history]

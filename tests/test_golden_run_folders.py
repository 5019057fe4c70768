"""Generated run folders are pinned byte for byte: refactoring the generator must not change them.

Each case writes a federation.yml (and the files it points at) under a temporary folder, generates
the run folder and compares every file with tests/golden/<case>/, the temporary folder's path
replaced by @ROOT@. To accept an intended change: XFFL_UPDATE_GOLDEN=1 python3 -m pytest this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xffl_cwl.federation import load_federation
from xffl_cwl.generator import generate

GOLDEN = Path(__file__).resolve().parent / "golden"

LOCAL = """\
name: golden-local
rounds: 3
model: model
test_set: data/test.jsonl
eval_batch_size: 4
training:
  local_steps: 20
  batch_size: 8
  lr: 0.003
  seq_len: 64
  weight_decay: 0.01
aggregation:
  strategy: nesterov
  momentum: 0.8
  min_updates: 2
facilities:
  - name: leonardo
    dataset: data/leonardo
  - name: lumi
    dataset: data/lumi.jsonl
    deployment: {kind: local, gpus: 2, workdir: scratch/lumi}
    training: {batch_size: 2, lr: 0.01, epochs: 1}
  - name: meluxina
    dataset: data/meluxina
    training: {grad_accum: 2, precision: bf16, seed: 3, text_field: body}
"""

HPC = """\
name: golden-hpc
rounds: 2
model: model
training:
  mode: lora
  lora: {r: 4, alpha: 8, targets: [q_proj, k_proj, v_proj], dropout: 0.05}
  local_steps: 10
  seq_len: 128
aggregation:
  strategy: fedadam
  betas: [0.8, 0.95]
  tau: 0.01
  server_lr: 0.02
  lora_merge: fedit
  weighting: tokens
  min_updates: 3
facilities:
  - name: leonardo
    dataset: /leonardo_work/PROJ/data/leonardo
    deployment:
      kind: slurm
      host: login.leonardo.cineca.it
      username: jdoe
      ssh_key: keys/id_ed25519
      known_hosts: keys/known_hosts
      template: leonardo
      sbatch: {account: PROJ_A, time: "02:00:00", gpus_per_node: 4, extra: ["--exclusive"]}
      container: {image: /leonardo_work/PROJ/images/client.sif}
      setup: ["module load cuda"]
      workdir: /leonardo_scratch/jdoe/xffl
      max_concurrent_jobs: 2
      polling_interval: 10
  - name: lumi
    dataset: /scratch/project_1/data/lumi.jsonl
    deployment:
      kind: slurm
      host: lumi.csc.fi
      port: 2222
      username: jdoe
      ssh_key: keys/id_ed25519
      template: lumi
      sbatch: {account: project_1, partition: standard-g, nodes: 2}
      container: {image: /scratch/project_1/client.sif, options: ["--rocm", "--cleanenv"]}
      workdir: /scratch/project_1/xffl
      retries: 5
  - name: vega
    dataset: /ceph/hpc/data/vega
    deployment:
      kind: slurm
      host: login.vega.izum.si
      username: jdoe
      check_host_key: false
      template: templates/site.sh
      sbatch: {partition: cpu, cpus_per_task: 8, mem: 32G}
      container: {runtime: none}
      workdir: /ceph/hpc/home/jdoe/xffl
      connect_timeout: 10
    training: {batch_size: 4}
"""

SITE_TEMPLATE = """\
#!/bin/bash
#SBATCH --partition={{ partition }}
{% for line in setup %}
{{ line }}
{% endfor %}
{{ streamflow_command }}
"""


def _inputs(root: Path) -> None:
    (root / "model").mkdir(parents=True)
    (root / "model" / "config.json").write_text("{}\n")
    (root / "data" / "leonardo").mkdir(parents=True)
    (root / "data" / "meluxina").mkdir(parents=True)
    (root / "data" / "lumi.jsonl").write_text('{"text": "a"}\n')
    (root / "data" / "test.jsonl").write_text('{"text": "a"}\n')
    (root / "keys").mkdir()
    (root / "keys" / "id_ed25519").write_text("not a key\n")
    (root / "keys" / "known_hosts").write_text("\n")
    (root / "templates").mkdir()
    (root / "templates" / "site.sh").write_text(SITE_TEMPLATE)


def _generated(root: Path, case: str, text: str) -> dict[str, str]:
    _inputs(root)
    (root / "federation.yml").write_text(text)
    out = root / "run"
    generate(load_federation(root / "federation.yml"), out)
    return {
        str(p.relative_to(out)): p.read_text(encoding="utf-8").replace(str(root), "@ROOT@")
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(("case", "text"), [("local", LOCAL), ("hpc", HPC)])
def test_run_folder_matches_golden(tmp_path, case, text):
    files = _generated(tmp_path, case, text)
    golden = GOLDEN / case
    if os.environ.get("XFFL_UPDATE_GOLDEN"):
        for rel, body in files.items():
            (golden / rel).parent.mkdir(parents=True, exist_ok=True)
            (golden / rel).write_text(body, encoding="utf-8")
    expected = {
        str(p.relative_to(golden)): p.read_text(encoding="utf-8") for p in sorted(golden.rglob("*")) if p.is_file()
    }
    assert sorted(files) == sorted(expected)
    for rel, body in files.items():
        assert body == expected[rel], f"{case}/{rel} differs from tests/golden/{case}/{rel}"

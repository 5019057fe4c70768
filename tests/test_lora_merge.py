"""LoRA merging: `exact` reproduces the mean of B_i A_i, FedIT's separate averages do not."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_aggregate, write_global, write_update
from xffl_cwl.learning.model_dir import fingerprint

OUT_F, IN_F = 24, 16
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def _config(r: int, alpha: float) -> dict:
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "v_proj"],
        "use_dora": False,
        "fan_in_fan_out": False,
    }


def _adapter(seed: int, r: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in MODULES:
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, IN_F, generator=g) * 0.3
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(OUT_F, r, generator=g) * 0.3
    return tensors


@pytest.fixture
def setup(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"{m}.weight": torch.randn(OUT_F, IN_F, generator=g) for m in MODULES}
    base["model.norm.weight"] = torch.ones(IN_F)
    gdir = write_global(tmp_path / "global", base)
    fp = fingerprint(gdir)
    samples = [5, 15, 30]
    alpha, r = 16.0, 4
    adapters = [_adapter(10 + i, r) for i in range(3)]
    paths = [
        write_update(
            tmp_path / f"u{i}", f"fac{i}", a, fp, samples=samples[i], mode="lora", adapter_config=_config(r, alpha)
        )
        for i, a in enumerate(adapters)
    ]
    weights = torch.tensor(samples, dtype=torch.float64) / sum(samples)
    scale = alpha / r
    true_delta = {
        m: sum(
            weights[i]
            * scale
            * (
                adapters[i][f"base_model.model.{m}.lora_B.weight"].double()
                @ adapters[i][f"base_model.model.{m}.lora_A.weight"].double()
            )
            for i in range(3)
        )
        for m in MODULES
    }
    return tmp_path, base, paths, adapters, weights, scale, true_delta


def _relative_error(delta: torch.Tensor, true: torch.Tensor) -> float:
    return float(torch.linalg.norm(delta - true) / torch.linalg.norm(true))


def test_exact_merge_reproduces_mean_of_products(setup):
    tmp_path, base, paths, _, _, _, true_delta = setup
    result = run_aggregate(
        global_dir=tmp_path / "global", updates=paths, out=tmp_path / "exact", lora_merge="exact", chunk_elems=50
    )
    merged = load_file(str(tmp_path / "exact" / "model.safetensors"))
    for m in MODULES:
        err = _relative_error(merged[f"{m}.weight"].double() - base[f"{m}.weight"].double(), true_delta[m])
        assert err < 2e-6, (m, err)
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    assert not (tmp_path / "exact" / "adapter").exists()  # the next round starts fresh adapters
    assert result["lora_merge"] == "exact"


def test_fedit_averages_a_and_b_separately_and_is_inexact(setup):
    tmp_path, base, paths, adapters, weights, scale, true_delta = setup
    run_aggregate(global_dir=tmp_path / "global", updates=paths, out=tmp_path / "fedit", lora_merge="fedit")
    out = tmp_path / "fedit"
    assert torch.equal(load_file(str(out / "model.safetensors"))["model.norm.weight"], base["model.norm.weight"])
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    for m in MODULES:
        a_name, b_name = f"base_model.model.{m}.lora_A.weight", f"base_model.model.{m}.lora_B.weight"
        mean_a = sum(weights[i] * adapters[i][a_name].double() for i in range(3))
        mean_b = sum(weights[i] * adapters[i][b_name].double() for i in range(3))
        torch.testing.assert_close(adapter[a_name].double(), mean_a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(adapter[b_name].double(), mean_b, rtol=1e-6, atol=1e-7)
        # the product of the means misses the cross terms B_i A_j
        assert _relative_error(scale * (mean_b @ mean_a), true_delta[m]) > 0.1


def test_exact_merge_accepts_different_ranks(setup):
    tmp_path, _base, paths, _, _, _, _ = setup
    fp = fingerprint(tmp_path / "global")
    low = _adapter(99, 2)
    extra = write_update(
        tmp_path / "u-rank2", "rank2", low, fp, samples=10, mode="lora", adapter_config=_config(2, 16.0)
    )
    result = run_aggregate(
        global_dir=tmp_path / "global", updates=[*paths, extra], out=tmp_path / "mixed", lora_merge="exact"
    )
    assert set(result["facilities"]) == {"fac0", "fac1", "fac2", "rank2"}
    # FedIT cannot average different shapes and rejects the odd one out
    result = run_aggregate(
        global_dir=tmp_path / "global", updates=[*paths, extra], out=tmp_path / "mixed-fedit", lora_merge="fedit"
    )
    assert [r["facility"] for r in result["rejected"]] == ["rank2"]
    assert "shape" in result["rejected"][0]["reason"]


def test_fedit_second_round_steps_from_the_global_adapter(setup):
    tmp_path, _, paths, _, _, _, _ = setup
    run_aggregate(global_dir=tmp_path / "global", updates=paths, out=tmp_path / "round1", lora_merge="fedit")
    g1 = tmp_path / "round1"
    fp = fingerprint(g1)
    previous = load_file(str(g1 / "adapter" / "adapter_model.safetensors"))
    ups = [
        write_update(
            tmp_path / f"v{i}",
            f"fac{i}",
            {k: v + 0.01 * (i + 1) for k, v in previous.items()},
            fp,
            samples=1,
            round_number=2,
            mode="lora",
            adapter_config=_config(4, 16.0),
        )
        for i in range(2)
    ]
    run_aggregate(
        global_dir=g1,
        updates=ups,
        out=tmp_path / "round2",
        lora_merge="fedit",
        strategy="fedavgm",
        server_lr=1.0,
        momentum=0.5,
    )
    new = load_file(str(tmp_path / "round2" / "adapter" / "adapter_model.safetensors"))
    for k, v in previous.items():
        # pseudo-gradient is -0.015 everywhere, momentum starts at zero: one step of lr 1 moves by +0.015
        torch.testing.assert_close(new[k], v + 0.015, rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="fedit"):
        run_aggregate(global_dir=g1, updates=ups, out=tmp_path / "round2-exact", lora_merge="exact")
    assert not (tmp_path / "round2-exact").exists()


@pytest.mark.parametrize("strategy", ["fedavg", "nesterov"])
def test_exact_lora_change_is_rebuilt_bit_for_bit_from_low_rank_factors(setup, strategy):
    """With fedavg the change of each adapted weight is sent as factors of rank sum(r_i) (here 3 x 4 = 12 of
    24 x 16): the facility's B @ A is computed as the aggregator's, so its copy equals the new model; with a
    server optimizer the change is no longer low-rank and is sent dense."""
    from xffl_cwl.contract.options import AggregateOptions
    from xffl_cwl.learning.aggregation import AggregateConfig, aggregate
    from xffl_cwl.learning.model_change import rebuild

    tmp_path, base, paths, _, _, _, true_delta = setup
    named = [f"fac{i}={p}" for i, p in enumerate(paths)]
    out, change = tmp_path / f"out-{strategy}", tmp_path / f"change-{strategy}"
    options = AggregateOptions(strategy=strategy, server_lr=1.0 if strategy == "fedavg" else 0.5)
    record = aggregate(AggregateConfig(tmp_path / "global", named, out, options, change_out=change))
    assert rebuild(tmp_path / "global", change, tmp_path / f"copy-{strategy}") == record.fingerprint
    assert record.change.kind == ("low_rank" if strategy == "fedavg" else "delta")
    if strategy == "fedavg":
        factors = load_file(str(change / "factors.safetensors"))
        assert factors[f"{MODULES[0]}.weight::B"].shape == (OUT_F, 12)
        assert factors[f"{MODULES[0]}.weight::A"].shape == (12, IN_F)
        merged = load_file(str(out / "model.safetensors"))
        for m in MODULES:  # still the exact mean of the products
            assert _relative_error(merged[f"{m}.weight"].double() - base[f"{m}.weight"].double(), true_delta[m]) < 1e-5
        assert "model.norm.weight::B" not in factors


def test_fedit_change_is_the_adapter_and_the_base_stays_linked(setup):
    from xffl_cwl.contract.options import AggregateOptions
    from xffl_cwl.learning.aggregation import AggregateConfig, aggregate
    from xffl_cwl.learning.model_change import rebuild

    tmp_path, _, paths, _, _, _, _ = setup
    named = [f"fac{i}={p}" for i, p in enumerate(paths)]
    options = AggregateOptions(lora_merge="fedit")
    record = aggregate(
        AggregateConfig(tmp_path / "global", named, tmp_path / "out", options, change_out=tmp_path / "c")
    )
    assert record.change.kind == "adapter"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["adapter", "change.json"]
    assert rebuild(tmp_path / "global", tmp_path / "c", tmp_path / "copy") == record.fingerprint
    base_file, copied = tmp_path / "global" / "model.safetensors", tmp_path / "copy" / "model.safetensors"
    assert copied.stat().st_ino == base_file.stat().st_ino  # the base was not rewritten, nor copied

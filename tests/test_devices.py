"""Device profiles (built-in, user JSON/TOML, this host), the fit check's predictions against hand computations,
and the device budget's one-line refusal."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bitsmith.cli import main
from bitsmith.devices import PROFILES, GiB, device_profile, for_device
from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions, MemoryOptions
from bitsmith.passes.kv_plan import KVPlanOptions, plan_kv_cache
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.memory import RUNTIME_BASE_BYTES, serving_memory
from bitsmith.tools.fit import check_fit, require_fit

MiB = 1 << 20


def test_builtin_profiles():
    for name in ("raspberry-pi-5", "raspberry-pi-4", "jetson-orin-nano-8gb", "aarch64-server"):
        p = device_profile(name)
        assert p.name == name and p.arch == "aarch64" and p.bandwidth_gbs > 0 and p.cores >= 4 and p.source
        assert p.model_budget == p.ram_bytes - p.reserved_bytes - RUNTIME_BASE_BYTES > 0
        assert p.compile_target == f"aarch64-linux:{p.llvm_cpu}"
    pi5, pi4 = PROFILES["raspberry-pi-5"], PROFILES["raspberry-pi-4"]
    assert pi5.ram_bytes == 8 * GiB and pi5.llvm_cpu == "cortex-a76" and "dotprod" in pi5.features
    assert pi4.ram_bytes == 4 * GiB and pi4.llvm_cpu == "cortex-a72" and pi4.features == ("neon",)  # Armv8.0
    with pytest.raises(BitsmithError, match="unknown device 'pi9'.*raspberry-pi-5"):
        device_profile("pi9")


def test_host_profile_is_measured():
    host = device_profile("host")
    assert host.bandwidth_gbs > 0.5 and host.gflops > 0.1 and 0 < host.usable_bytes <= host.ram_bytes
    assert host.cores >= 1 and "measured" in host.source and host.compile_target == "host"


def test_user_profiles_json_and_toml(tmp_path):
    (tmp_path / "board.json").write_text(json.dumps(
        {"name": "board", "ram": "6GiB", "reserved": "512MiB", "bandwidth_gbs": 7.5, "cores": 8,
         "features": ["neon", "dotprod", "i8mm"], "llvm_cpu": "cortex-a78", "gflops": 100}))
    p = device_profile(tmp_path / "board.json")
    assert (p.name, p.ram_bytes, p.reserved_bytes, p.bandwidth_gbs, p.cores) == ("board", 6 * GiB, 512 * MiB, 7.5, 8)
    assert p.features == ("neon", "dotprod", "i8mm") and p.compile_target == "aarch64-linux:cortex-a78"
    (tmp_path / "box.toml").write_text('[device]\nram = "2GB"\nbandwidth_gbs = 3\ncores = 2\narch = "x86_64"\n')
    t = device_profile(str(tmp_path / "box.toml"))
    assert (t.name, t.ram_bytes, t.reserved_bytes, t.arch, t.compile_target) == ("box", 2 * 10**9, GiB // 2, "x86_64", "host")
    (tmp_path / "bad.json").write_text(json.dumps({"ram": "1GB", "cores": 2}))
    with pytest.raises(BitsmithError, match="lacks bandwidth_gbs"):
        device_profile(tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text(json.dumps({"ram": "1GB", "cores": 2, "bandwidth_gbs": 1, "ramm": 3}))
    with pytest.raises(BitsmithError, match="unknown device profile keys"):
        device_profile(tmp_path / "typo.json")


def test_for_device_sets_budget_and_aarch64_target():
    pi4 = PROFILES["raspberry-pi-4"]
    options = for_device(CompileOptions(), pi4)
    assert int(options.memory.budget) == pi4.model_budget and options.memory.device.startswith("raspberry-pi-4 (")
    assert options.target.name == "aarch64-linux" and options.target.cpu == "cortex-a72"
    smaller = for_device(CompileOptions(memory=MemoryOptions(budget="1GB")), pi4)
    assert int(smaller.memory.budget) == 10**9  # an explicit --memory below the device's budget wins


def _profile(tmp_path, **fields):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"name": "dev", "arch": "x86_64", "reserved": 0, "cores": 1, **fields}))
    return device_profile(path)


def test_predictions_match_a_hand_computation(tiny_artifact, tmp_path):
    """Tiny Llama, fp32, untied: a decode step reads every weight once except the embedding table (one row)."""
    path = tiny_artifact(CompileOptions())
    art = load_artifact(path)
    m = art.manifest
    cfg = m["model"]
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    params = m["weights"]["parameters"]
    decode_bytes = 4 * (params - vocab * hidden) + 4 * hidden
    kv = m["kv_plan"]  # float16 KV: keys + values of every layer per position
    per_position = len(kv["layer_dtypes"]) * 2 * kv["kv_heads"] * kv["head_dim"] * 2
    dev = _profile(tmp_path, ram=64 * GiB, bandwidth_gbs=2.0, gflops=3.0)
    r = check_fit(path, dev)
    assert r.decode_bytes_first == decode_bytes
    assert r.decode_bytes_full == decode_bytes + per_position * (kv["max_context"] - 1)
    assert r.decode_tok_s_first == pytest.approx(2e9 / decode_bytes, rel=1e-12)
    assert r.decode_tok_s_full == pytest.approx(2e9 / r.decode_bytes_full, rel=1e-12)
    batch = decode_bytes + kv["concurrency"] * per_position * (kv["max_context"] - 1)
    assert r.batch_tok_s_full == pytest.approx(kv["concurrency"] * 2e9 / batch, rel=1e-12)
    compute, bandwidth = 3e9 / (2 * (params - vocab * hidden)), 2e9 * 64 / decode_bytes
    assert r.prefill_rows == 64 and r.prefill_tok_s == pytest.approx(min(compute, bandwidth), rel=1e-12)
    assert r.resident == serving_memory(art)["full"] and r.fits
    assert check_fit(path, dev, runtime=100 * MiB).resident == r.resident - RUNTIME_BASE_BYTES + 100 * MiB
    tight = _profile(tmp_path, ram=r.resident - 1, bandwidth_gbs=2.0)
    assert not check_fit(path, tight).fits
    with pytest.raises(BitsmithError) as info:
        require_fit(path, tight)
    assert "\n" not in str(info.value) and "0 MiB short" in str(info.value) and "--device dev" in str(info.value)


def test_inspect_device_prints_rss_and_tok_s(tiny_artifact, tiny_llama_dir, tmp_path):
    path = tiny_artifact(CompileOptions())
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps({"name": "dev", "arch": "x86_64", "ram": "8GiB", "bandwidth_gbs": 2, "cores": 1}))
    result = CliRunner().invoke(main, ["inspect", str(path), "--device", str(dev)])
    assert result.exit_code == 0, result.output
    fit = check_fit(path, device_profile(dev))
    assert f"predicted RSS on dev: {fit.resident / MiB:.0f} MiB" in result.output and ": fits" in result.output
    assert f"{fit.decode_tok_s_first:.1f} tok/s at the first token" in result.output
    as_json = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--device", str(dev), "--json"]).output)
    assert as_json["device"]["fit"]["resident"] == fit.resident
    model = CliRunner().invoke(main, ["inspect", str(tiny_llama_dir), "--device", "raspberry-pi-5"])
    assert model.exit_code == 2 and "is not a compiled artifact" in model.output


def test_device_refusal_names_the_context_and_bits_that_fit():
    """A 1.7B-shaped model (24 layers, 32 KV heads of 64, bf16) on 3000 MiB: hand-computed hints."""
    params, label = 1_700_000_000, "pi (4 GiB)"
    per_token = 22 * 2 * 32 * (32 + 8) + 2 * 2 * 32 * 64 * 2  # int4 KV (fp32 step, min), first and last layer fp16
    budget = 3000 * MiB
    with pytest.raises(BitsmithError) as info:
        plan_kv_cache(KVPlanOptions(budget, 32768, 4, device=label), 24, 32, 64, 2 * params, 0, weight_params=params)
    text = str(info.value)
    ctx = (budget - params * 5 // 8) // 4 // (16 * per_token) * 16
    assert "\n" not in text and text.startswith("kv plan: pi (4 GiB) holds 3000 MiB for the model")
    assert f"--context {ctx} with int4 KV and weights at ~5 bits/weight" in text
    assert "bitsmith search --device pi --context 32768" in text and "bits/weight on average" not in text
    with pytest.raises(BitsmithError) as info:
        plan_kv_cache(KVPlanOptions(budget, 2048, 1, device=label), 24, 32, 64, 2 * params, 0, weight_params=params)
    bits = 8 * (budget - 2048 * per_token) / params
    assert f"weights of at most {bits:.1f} bits/weight on average (now 16.0)" in str(info.value)


def test_compile_device_refuses_in_one_line(tiny_llama_dir, tmp_path):
    dev = tmp_path / "small.json"
    dev.write_text(json.dumps({"name": "small", "arch": "x86_64", "ram": RUNTIME_BASE_BYTES + 600_000,
                               "reserved": 0, "bandwidth_gbs": 1, "cores": 1}))
    result = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--device",
                                       str(dev), "--context", "128", "--concurrency", "64"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "small (" in errors[0] and "--context " in errors[0], result.output
    assert not (tmp_path / "out").exists()


def test_search_device_takes_the_budget_and_one_of_memory_or_device(tmp_path):
    both = CliRunner().invoke(main, ["search", "--memory", "80MB", "--device", "raspberry-pi-4",
                                     "-o", str(tmp_path / "p")])
    neither = CliRunner().invoke(main, ["search", "-o", str(tmp_path / "p")])
    assert both.exit_code == neither.exit_code == 2 and "one of --memory SIZE or --device NAME" in both.output


def test_profile_features_agree_with_llvm():
    """A profile's dotprod must be what LLVM's CPU gives (the int8-activation sdot GEMVs need it)."""
    from bitsmith.codegen.target import resolve_target

    for profile in PROFILES.values():
        target = resolve_target(profile.compile_target)
        assert target.mcpu == profile.llvm_cpu
        assert target.supports_int8_activations == ("dotprod" in profile.features), profile.name

"""bench/quality.py's grid, skip reasons, row reuse and target ratios, on synthetic reports (no model runs)."""

from __future__ import annotations

import json
import sys
from argparse import Namespace

from conftest import REPO_ROOT

sys.path.append(str(REPO_ROOT / "bench"))  # last: bench/kernels.py must not shadow the `kernels` package

from quality import Reuse, settings_of  # noqa: E402
from quality_grid import RowSpec, grid, missing_piece, peer_grid, row  # noqa: E402
from quality_report import targets  # noqa: E402


def grid_args(**kw) -> Namespace:
    base = dict(methods="rtn,gptq", rotations="none,hadamard", schemes="default", kv_rows=False, act_rows=False,
                peer="none,spinquant", peer_schemes="int4 per-channel,int3 g32")
    return Namespace(**{**base, **kw})


def test_default_grid_rotates_only_the_issue_schemes():
    specs = grid("smollm2", grid_args())
    rotated = {s.scheme for s in specs if s.rotation == "hadamard"}
    assert rotated == {"int4 per-channel", "int4 g32", "int3 g32", "int2 g32"}
    # earlier schemes unrotated (2 methods x 2), issue schemes (4 x 2 methods x 2 rotations), the Q4_1 sanity row
    assert len(specs) == 4 + 16 + 1
    assert len({s.key for s in specs}) == len(specs)


def test_kv_and_act_rows():
    specs = grid("tinystories", grid_args(schemes="int4 g32", kv_rows=True, act_rows=True))
    kv = [s for s in specs if s.kv != "auto"]
    assert {(s.method, s.rotation, s.kv) for s in kv} == {
        ("none", "none", "int8"), ("none", "none", "int4"), ("none", "hadamard", "int4"),
        ("gptq", "none", "int8"), ("gptq", "none", "int4"), ("gptq", "hadamard", "int4")}
    act = [s for s in specs if s.activations == "int8"]
    assert len(act) == 2 * 2 * 2  # int4 per-channel/g32 x rtn/gptq x 2 rotations
    # an int8-activation row scores the artifact of its float32 twin
    assert act[0].artifact_name == row(act[0].method, act[0].rotation, act[0].scheme).artifact_name


def test_missing_piece_names_the_flag_or_choice():
    choices = {"--method": ("rtn", "gptq"), "--bits": ("2", "3", "4", "8"), "--kv-dtype": ("auto", "int8")}
    assert missing_piece(row("gptq", "none", "int4 g32"), choices) is None
    assert "no --rotate" in missing_piece(row("gptq", "hadamard", "int4 g32"), choices)
    assert "--method does not offer hqq" in missing_piece(row("hqq", "none", "int4 g32"), choices)
    assert "--kv-dtype does not offer int4" in missing_piece(row("none", "none", "16-bit", kv="int4"), choices)


def test_peer_grid_is_scheme_major():
    assert [(r, s) for r, s, *_ in peer_grid("smollm2", grid_args())] == [
        ("none", "int4 per-channel"), ("spinquant", "int4 per-channel"), ("none", "int3 g32"), ("spinquant", "int3 g32")]
    assert peer_grid("smollm2", grid_args(peer="")) == []


def _report(tokens: int) -> dict:
    return {"format": 2, "model": "M", "text": "t.txt", "ctx": 256, "tokens": tokens, "bos": True, "calibration": "c",
            "rows": [{**row("gptq", "none", "int4 per-channel").json(), "ppl": 30.0, "kld_mean": 0.4},
                     {**row("gptq", "hadamard", "int4 per-channel").json(), "ppl": 29.0, "kld_mean": 0.1},
                     {**row("gptq", "learned", "int3 g32").json(), "skipped": "no --rotate learned"}],
            "peer_rows": [{"rotation": "spinquant", "scheme": "int4 per-channel", "ppl": 29.5, "kld_mean": 0.2}]}


def test_reuse_takes_measured_rows_with_identical_settings(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"host": {}, "smollm2": _report(1024)}))
    reuse = Reuse(path)
    rows, peers = reuse.rows("smollm2", settings_of(_report(1024)))
    assert set(rows) == {row("gptq", "none", "int4 per-channel").key, row("gptq", "hadamard", "int4 per-channel").key}
    assert set(peers) == {("spinquant", "int4 per-channel")}
    assert reuse.rows("smollm2", settings_of(_report(2048))) == ({}, {})  # other token count: nothing reused
    assert reuse.rows("smollm2", settings_of({**_report(1024), "format": 3})) == ({}, {})  # other format
    assert RowSpec.key_of({"method": "rtn", "scheme": "int4 g32"}) == row("rtn", "none", "int4 g32").key  # old JSON


def test_targets_state_the_measured_ratios():
    text = "\n".join(targets(_report(1024)))
    assert "int4 per-channel, hadamard: GPTQ+hadamard / GPTQ = 0.1000 / 0.4000 = **0.25**" in text
    assert "int3 g32, learned: GPTQ+learned / GPTQ = not measured" in text
    assert "ours GPTQ+hadamard vs peer GPTQ+spinquant, int4 per-channel: 0.1000 / 0.2000 = **0.50**" in text
    assert "KV" not in text  # no KV rows in the grid: no KV target line


def test_clip_rows_double_the_rtn_and_gptq_rows_and_state_their_targets():
    specs = grid("smollm2", grid_args(schemes="int4 per-channel", clips="none,mse", methods="rtn,gptq,awq"))
    clipped = [s for s in specs if s.clip == "mse"]
    assert {(s.method, s.rotation) for s in clipped} == {(m, r) for m in ("rtn", "gptq") for r in ("none", "hadamard")}
    assert len({s.key for s in specs}) == len(specs) == 6 + 4
    assert len({s.artifact_name for s in specs}) == len(specs)
    assert "no --clip" in missing_piece(clipped[0], {"--method": ("rtn", "gptq"), "--bits": ("4",)})
    report = _report(1024)
    report["rows"] += [{**row("gptq", "none", "int4 per-channel").json(), "clip": "mse", "ppl": 29.0, "kld_mean": 0.2},
                       {**row("gptq", "hadamard", "int4 per-channel").json(), "clip": "mse", "ppl": 28.0,
                        "kld_mean": 0.05}]
    text = "\n".join(targets(report))
    assert ("with --clip mse on both sides, int4 per-channel, hadamard: GPTQ+clip+hadamard / GPTQ+clip = 0.0500 / "
            "0.2000 = **0.25**; against plain GPTQ: 0.0500 / 0.4000 = **0.12**") in text

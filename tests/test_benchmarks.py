"""The benchmark scripts run and write the rows their docs promise (tiny sizes; timings are not checked)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_moe_layer_benchmark_writes_one_row_per_measurement(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "moe_layer.py"), "--tokens", "64", "128",
                           "--experts", "4", "--hidden", "32", "--ffn", "64", "--repeats", "1", "--warmup", "0",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert sorted((r["impl"], r["tokens"]) for r in rows) == sorted(
        (impl, tokens) for impl in ("ours", "deepspeed", "loop", "dense") for tokens in (64, 128))
    for row in rows:
        assert {"impl", "tokens", "experts", "top_k", "hidden", "tokens_per_second", "device"} <= set(row)
        assert row["experts"] == 4 and row["top_k"] == 2 and row["hidden"] == 32 and row["tokens_per_second"] > 0
    assert "vs deepspeed" in done.stdout

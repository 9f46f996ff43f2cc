"""``gkd bench op`` at a tiny size: the three versions run, agree, and the JSON carries what the table prints."""
import json

from click.testing import CliRunner

from gkd.bench.op import format_table, op, run_op_benchmark


def test_run_op_benchmark_tiny():
    r = run_op_benchmark(threads=1, batch=1, channels=4, height=64, width=96, strides=(4, 8), instances=6,
                         prototypes=10, repeats=2, reference_repeats=1, warmup=0)
    assert set(r["results"]) == {"extension", "vectorized", "per_instance"}
    assert r["levels"] == [[16, 24], [8, 12]] and r["feature_bytes"] == 4 * 4 * (16 * 24 + 8 * 12)
    assert r["max_abs_diff_extension_vs_vectorized"] < 1e-5
    assert r["copy_bandwidth_gbs"] > 0 and r["floor"]["forward_backward_ms"] > r["floor"]["forward_ms"] > 0
    for res in r["results"].values():
        assert 0 < res["forward"]["min_ms"] <= res["forward"]["median_ms"]
    table = format_table(r)
    assert "extension" in table and "memory-traffic floor" in table


def test_op_command_writes_json(tmp_path):
    out = tmp_path / "op.json"
    result = CliRunner().invoke(op, ["--threads", "1", "--batch", "1", "--channels", "2", "--image-size", "32", "48",
                                     "--strides", "8", "--instances", "3", "--prototypes", "4", "--repeats", "1",
                                     "--reference-repeats", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"extension", "vectorized"} and data["strides"] == [8]
    assert "fwd+bwd speed-up" in result.output

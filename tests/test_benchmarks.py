"""The benchmark runner in its smoke mode: the table is complete and finite (speed itself
is not asserted here), and the layer shapes are read off the real models."""
import json
import math

from benchmarks import run
from benchmarks.shapes import unet_layer_shapes


def test_smoke_table_is_complete_and_finite(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert run.main(["--smoke", "--quiet", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["rows"]
    layer_rows = [r for r in rows if r["pass_"] in ("fwd", "fwd+bwd")]
    assert len(layer_rows) == len(run.SMOKE_SHAPES) * 2 * 2  # shapes x modes x passes
    for r in layer_rows:
        assert set(r["ms"]) == set(run.IMPLS)
        assert all(math.isfinite(v) and v > 0 for v in r["ms"].values())
        if r["pass_"] == "fwd+bwd":
            assert set(r["peak_mb"]) == {"fused", "reference"}
            assert all(math.isfinite(v) and v >= 0 for v in r["peak_mb"].values())
    step = [r for r in rows if r["pass_"] == "step"]
    assert len(step) == 1 and set(step[0]["ms"]) == {"fused", "reference"}
    assert all(math.isfinite(v) and v > 0 for v in step[0]["ms"].values())
    assert data["environment"]["torch"]
    for label in ("fused", "reference", "lean", "compiled", "geometric means"):
        assert label in table
    assert "nan" not in table and "inf" not in table


def test_layer_shapes_follow_the_models():
    at256 = unet_layer_shapes(256)
    labels = [s.label for s in at256["pconv"]]
    assert labels[0] == "3->64 k7 s2 @256" and labels[-1] == "67->3 k3 s1 @256"
    assert "1024->512 k3 s1 @16" in labels and len(labels) == 14
    modified = [s.label for s in at256["modified"]]
    assert modified[0] == "3->64 k3 s1 @256" and "64->64 k3 s1 @256" in modified
    at512 = [s.label for s in unet_layer_shapes(512)["pconv"]]
    assert at512[0] == "3->64 k7 s2 @512" and "512->512 k3 s2 @4" in at512  # 8 levels

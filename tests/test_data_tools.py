"""tools/write_ffcv.py and tools/bench_loader.py end to end on tiny data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from process_support import load_tool

pytest.importorskip("ffcv")

from rat.config import ConfigError  # noqa: E402
from rat.data import read_beton_info, read_beton_item, read_classes  # noqa: E402

pytestmark = [pytest.mark.ffcv, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]


def _imagenet_like(root: Path) -> None:
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0]
    for split, count in (("train", 3), ("val", 2)):
        for c, name in enumerate(("n02", "n01")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                crop = photo[40 * i:40 * i + 300, 60 * c:60 * c + 400]
                Image.fromarray(np.ascontiguousarray(crop)).save(root / split / name / f"{i}.JPEG", quality=90)
    (root / "train" / "n01" / "bad.JPEG").write_bytes(b"not a jpeg at all")


def test_write_ffcv_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tool = load_tool("write_ffcv")
    _imagenet_like(tmp_path / "imagenet")
    out = tmp_path / "ffcv"
    out.mkdir()
    base = [f"--cfg.data_dir={tmp_path / 'imagenet'}", "--cfg.num_workers=2"]

    status = tool.main([*base, "--cfg.split=train", f"--cfg.write_path={out / 'train.beton'}"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 1  # written, with an unreadable file left out and named
    assert summary["num_samples"] == 6 and summary["num_classes"] == 2
    assert summary["unreadable_count"] == 1 and summary["unreadable"][0]["file"].endswith("n01/bad.JPEG")
    assert read_classes(out / "train.beton") == ["n01", "n02"]
    info = read_beton_info(out / "train.beton")
    assert info["options"]["max_resolution"] == 256 and info["options"]["write_mode"] == "proportion"
    assert max(read_beton_item(out / "train.beton", 0)[0].shape) == 256

    status = tool.main([*base, "--cfg.split=val", f"--cfg.write_path={out / 'val.beton'}",
                        f"--cfg.classes_from={out / 'train.beton'}", "--cfg.strict=1"])
    assert status == 0
    val_options = read_beton_info(out / "val.beton")["options"]
    assert val_options["max_resolution"] is None and val_options["write_mode"] == "raw"  # original pixels
    assert read_beton_info(out / "val.beton")["files"] == ["n01/0.JPEG", "n01/1.JPEG", "n02/0.JPEG", "n02/1.JPEG"]
    assert [read_beton_item(out / "val.beton", i)[1] for i in range(4)] == [0, 0, 1, 1]

    assert tool.main([*base, "--cfg.split=train", f"--cfg.write_path={out / 'strict.beton'}",
                      "--cfg.strict=1"]) == 2
    assert "bad.JPEG" in capsys.readouterr().err
    assert not (out / "strict.beton").exists()
    assert tool.main([*base, "--cfg.jpeg_quality=101"]) == 2
    assert "cfg.jpeg_quality='101' is not an int and between 1 and 100" in capsys.readouterr().err
    assert tool.main(base) == 2
    assert "--cfg.write_path required" in capsys.readouterr().err


def test_write_ffcv_yaml_is_strict(tmp_path: Path) -> None:
    """An unknown key in a -C file is refused with the key and the closest declared one (fastargs would drop it)."""
    tool = load_tool("write_ffcv")
    config = tmp_path / "write.yaml"
    config.write_text("cfg:\n  data_dir: /nowhere\n  write_path: /nowhere/x.beton\n  max_resolutoin: 128\n")
    with pytest.raises(ConfigError, match=r"unknown key 'cfg.max_resolutoin'.*did you mean 'cfg.max_resolution'\?"):
        tool.make_spec(["-C", str(config)])
    config.write_text("cfg:\n  data_dir: /nowhere\n  write_path: /nowhere/x.beton\n  max_resolution: 128\n")
    assert tool.make_spec(["-C", str(config)]).max_resolution == 128


def test_bench_loader_prints_the_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_loader.py"), "--make-data", str(tmp_path / "jpegs"),
         "--num-images", "32", "--batch-size", "8", "--workers", "1", "--resolution", "64", "--warmup-epochs", "0",
         "--min-seconds", "0", "--repeats", "2"],
        capture_output=True, text=True, timeout=540, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("rat_img_s", "torchvision_img_s", "rat_heavy_img_s", "torchvision_heavy_img_s", "speedup_plain"):
        assert result[key] > 0, key
    assert result["settings"]["images"] == 32 and result["settings"]["beton"]["max_resolution"] == 256
    assert result["repeats"] == 2 and set(result["load_average_1_5_15min"]) == {"before", "after"}
    for key in ("rat_heavy_img_s", "speedup_heavy", "heavy_cost_rat_ms_per_img"):
        spread = result["ranges"][key]
        assert len(spread["runs"]) == 2 and spread["min"] <= spread["median"] <= spread["max"], key

"""`python -m pipeline requests` (offline): the cdsapi requests for configs/era5_cams_china.yaml."""

from __future__ import annotations

import fnmatch
import json

from pipeline.__main__ import main
from pipeline.config import load_pipeline_config
from pipeline.requests import requests
from tests.helpers import REPO

CONFIG = REPO / "configs" / "era5_cams_china.yaml"


def test_one_request_per_month_per_source_with_area_dates_and_matching_targets():
    data = load_pipeline_config(CONFIG).data
    found = requests(data)
    by_source = {s: [r for r in found if r["source"] == s] for s in ("era5", "era5_invariant", "cams")}
    assert [len(v) for v in by_source.values()] == [72, 1, 72]  # 2013-2018 monthly, the invariants once
    era5 = by_source["era5"][1]
    assert era5["dataset"] == "reanalysis-era5-single-levels"
    assert era5["request"]["area"] == [48.0, 69.0, 14.0, 135.0]  # [N, W, S, E]: 15-47 N, 70-134 E plus 1 degree
    assert era5["request"]["year"] == ["2013"] and era5["request"]["month"] == ["02"]
    assert era5["request"]["day"] == [f"{d:02d}" for d in range(1, 29)]
    assert era5["request"]["variable"][0] == "10m_u_component_of_wind" and len(era5["request"]["time"]) == 24
    assert era5["target"] == "data/era5cams/era5/era5_single_levels_2013-02.nc"
    cams = by_source["cams"][-1]
    assert cams["dataset"] == "cams-global-reanalysis-eac4" and cams["request"]["model_level"] == ["60"]
    assert cams["request"]["date"] == ["2018-12-01/2018-12-31"] and cams["request"]["area"][0] == 48.5
    invariant = by_source["era5_invariant"][0]
    assert "day" in invariant["request"] and invariant["request"]["day"] == ["01"]  # its own fixed date
    for item in found:  # every download lands where its source's glob looks
        source = next(s for s in data.sources if s.name == item["source"])
        assert fnmatch.fnmatch(item["target"], source.files)


def test_cli_prints_one_json_line_per_request(capsys):
    assert main(["requests", "--config", str(CONFIG), "--set", "data.splits.val.end=2017-01-31T21:00",
                 "--set", "data.splits.test={start: 2017-02-01T00:00, end: 2017-02-28T21:00}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 2 * 50 + 1 and json.loads(lines[0])["request"]["month"] == ["01"]

"""`python -m pipeline requests`: the cdsapi requests that download each source of a recipe.

For every source with a `download` section: the dataset id and, per month of data.period (or once),
the request dict (the recipe's fixed part, the area [N, W, S, E] of data.domain plus a margin, and the
dates in the store's style) and the file it should be saved as, so that the source's `files` glob
matches it. Nothing is downloaded: run the printed calls with cdsapi (CDS for ERA5, ADS for CAMS).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from pipeline.config import DataConfig, load_pipeline_config
from pipeline.recipe import SourceSpec
from topoflow.config import add_override_argument
from topoflow.errors import ConfigError


def area(data: DataConfig, margin: float) -> list[float]:
    """[North, West, South, East] of data.domain plus `margin` degrees, as the data stores take it."""
    d = data.domain
    return [d.lat_south + d.n_lat * d.resolution + margin, d.lon_west - margin, d.lat_south - margin,
            d.lon_west + d.n_lon * d.resolution + margin]


def _dates(source: SourceSpec, start: pd.Timestamp, end: pd.Timestamp) -> dict:
    if source.download.dates == "fixed":
        return {}
    if source.download.dates == "date_range":
        return {"date": [f"{start:%Y-%m-%d}/{end:%Y-%m-%d}"]}
    days = pd.date_range(start.normalize(), end.normalize(), freq="D")
    return {"year": sorted({f"{t:%Y}" for t in days}), "month": sorted({f"{t:%m}" for t in days}),
            "day": sorted({f"{t:%d}" for t in days})}


def _target(source: SourceSpec, stamp: str) -> str:
    pattern = source.files if isinstance(source.files, str) else source.files[0]
    if "*" not in pattern:
        return pattern
    return str(Path(pattern).with_name(Path(pattern).name.replace("*", stamp, 1)))


def requests(data: DataConfig) -> list[dict]:
    """One {source, dataset, request, target} per download, in source order."""
    period, out = data.period, []
    for source in (s for s in data.sources if s.download):
        spans = [(pd.Timestamp(period.start), pd.Timestamp(period.end))] if source.download.per == "once" else [
            (max(m.start_time, pd.Timestamp(period.start)), min(m.end_time.floor("h"), pd.Timestamp(period.end)))
            for m in pd.period_range(period.start, period.end, freq="M")]
        for start, end in spans:
            request = {**source.download.request, "area": area(data, source.download.margin_deg),
                       **_dates(source, start, end)}
            stamp = f"{start:%Y-%m}" if source.download.per == "month" else "all"
            out.append({"source": source.name, "dataset": source.download.dataset, "request": request,
                        "target": _target(source, stamp)})
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (section data is used)")
    add_override_argument(parser, "data.splits.train.end=2013-01-31T23:00")


def run(args: argparse.Namespace) -> int:
    found = requests(load_pipeline_config(args.config, args.overrides).data)
    if not found:
        raise ConfigError(f"no source in {args.config} has a `download` section: nothing to request")
    for item in found:
        print(json.dumps(item))
    print(f"# {len(found)} request(s): cdsapi.Client().retrieve(dataset, request).download(target) for each line "
          "(ERA5 from the CDS, CAMS from the ADS: https://ads.atmosphere.copernicus.eu/api)")
    return 0

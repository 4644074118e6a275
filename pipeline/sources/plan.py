"""The sources plan: everything a build task needs to read a block, decided once in the main process.

`make_plan` opens every file (metadata), checks variables, grids, units and coverage before anything
is written, and settles which pool names are static or dynamic, their units, and the conversion of
every model variable into the units the store keeps. The plan is small and picklable: workers get
it with each task.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import DataConfig, VariableSpec
from pipeline.recipe import BUILTINS
from pipeline.sources.derived import FORMULAS
from pipeline.sources.files import Catalog, build_catalog, open_file
from pipeline.sources.grid import regridder
from pipeline.sources.units import Conversion, conversion
from topoflow.errors import SourceError

BUILTIN_UNITS = {"dem_elevation": "m", "dem_land_fraction": "1"}


@dataclass(frozen=True)
class SourcePlan:
    """Catalogs, the owner and units of every pool name, and each model variable's conversion."""

    data: DataConfig
    catalogs: tuple[Catalog, ...]
    owner: dict[str, int]  # source pool name -> catalog index
    units: dict[str, str]  # pool name -> units as found (sources), declared (formulas) or built in
    static_names: frozenset[str]
    conversions: dict[str, Conversion]  # model variable -> from its pool units to its store units

    def is_static(self, name: str) -> bool:
        return name in self.static_names

    @property
    def dynamic_catalogs(self) -> list[Catalog]:
        return [c for c in self.catalogs if not c.static]

    def dynamic_needs(self) -> set[str]:
        """Pool names a block must read or compute: dynamic inputs, what they derive from, air density."""
        wanted = {v.recipe_name for v in self.data.variables if v.kind == "dynamic"}
        if self.data.air_density:
            wanted |= {self.data.air_density.pressure, self.data.air_density.temperature}
        stack = list(wanted)
        while stack:
            spec = self.data.derived.get(stack.pop())
            for arg in spec.args.values() if spec else ():
                if arg not in wanted:
                    wanted.add(arg)
                    stack.append(arg)
        return {n for n in wanted if not self.is_static(n)}


def _source_units(catalog: Catalog) -> dict[str, str]:
    ds = open_file(catalog.files[0])
    units = {}
    for name, chosen in catalog.source.variables.items():
        found = ds[chosen.var].attrs.get("units")
        if found is None:
            raise SourceError(f"source {catalog.source.name!r}: {catalog.files[0]}: {chosen.var!r} has no units "
                              "attribute; add one (CF or ECMWF spelling) so it can be converted")
        units[name] = str(found)
    return units


def _static_names(data: DataConfig, catalogs: list[Catalog]) -> frozenset[str]:
    static = set(BUILTINS) | {n for c in catalogs if c.static for n in c.source.variables}
    changed = True
    while changed:  # a derived variable of static inputs is static
        new = {k for k, d in data.derived.items() if set(d.args.values()) <= static} - static
        static |= new
        changed = bool(new)
    return frozenset(static)


def _check_kinds(data: DataConfig, static: frozenset[str]) -> None:
    for spec in data.variables:
        if spec.kind == "coordinate":
            continue
        if (spec.kind == "static") != (spec.recipe_name in static):
            where = "has a time dim" if spec.kind == "static" else "has no time dim (or a single step)"
            raise SourceError(f"variable {spec.name!r} is declared {spec.kind} but {spec.recipe_name!r} {where}: "
                              "fix its `kind`, or put invariant fields in a source of their own")
    if data.static.elevation not in static:
        raise SourceError(f"static.elevation {data.static.elevation!r} has a time dim; the barrier needs an "
                          "invariant elevation (e.g. ERA5 geopotential / g0 from its own file, or dem_elevation)")


def _model_conversion(data: DataConfig, spec: VariableSpec, units: dict[str, str]) -> Conversion:
    found = conversion(units[spec.recipe_name], spec.units, f"variable {spec.name!r} (from {spec.recipe_name!r})")
    if found.density and data.air_density is None:
        raise SourceError(f"variable {spec.name!r}: converting {units[spec.recipe_name]!r} to {spec.units!r} needs the "
                          "air density: add `air_density: {pressure: psfc, temperature: temp}` to data")
    return found


def make_plan(data: DataConfig) -> SourcePlan:
    """Open and check every source, and decide units, kinds and conversions (nothing is written)."""
    catalogs = [build_catalog(source) for source in data.sources]
    owner = {name: i for i, c in enumerate(catalogs) for name in c.source.variables}
    units = dict(BUILTIN_UNITS)
    for catalog in catalogs:
        units.update(_source_units(catalog))
        regridder(catalog, data.domain)  # coverage of the domain, checked now
    units.update({name: FORMULAS[d.formula].units for name, d in data.derived.items()})
    for name, d in data.derived.items():
        for arg, pool in d.args.items():
            conversion(units[pool], FORMULAS[d.formula].args[arg], f"derived {name!r} argument {arg} ({pool!r})")
    if data.air_density:
        conversion(units[data.air_density.pressure], "Pa", "air_density.pressure")
        conversion(units[data.air_density.temperature], "K", "air_density.temperature")
    static = _static_names(data, catalogs)
    _check_kinds(data, static)
    conversion(units[data.static.elevation], "m", "static.elevation")
    conversions = {v.name: _model_conversion(data, v, units) for v in data.variables if v.kind != "coordinate"}
    return SourcePlan(data, tuple(catalogs), owner, units, static, conversions)


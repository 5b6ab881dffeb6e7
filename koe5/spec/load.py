"""From a spec file to validated, hashed, frozen experiments.

    expand(path, overrides)  -> [ResolvedSpec, ...]   one per sweep member
    ResolvedSpec.freeze(p)   -> the file every rank reads
    load_frozen(p)           -> the same ResolvedSpec, without re-composing anything

Order of work: compose (base chain, overrides) -> per sweep member: interpolate, type-check, resolve
paths, cross-field rules -> only if all of that is clean: device checks, file fingerprints, hash.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any, Sequence

from koe5.data.sources import is_hub_id
from koe5.spec import validate
from koe5.spec.compose import FROZEN_MARK, Origin, Origins, apply_override, check_path, interpolate, load_chain, set_path
from koe5.spec.deepspeed import deepspeed_config
from koe5.spec.schema import world_size as total_ranks
from koe5.spec.errors import SpecError
from koe5.spec.identity import data_paths, fingerprint, spec_hash
from koe5.spec.schema import Spec
from koe5.spec.yamlio import dump_yaml, load_yaml_file, parse_yaml



@dataclasses.dataclass
class ResolvedSpec:
    """One concrete experiment: a typed Spec, its canonical dict and its content hash."""

    spec: Spec
    data: dict                       # canonical resolved dict: every key, absolute paths, no base/sweep
    spec_hash: str
    sweep_values: dict[str, Any]     # key path -> value for sweep members, {} otherwise
    source_path: Path | None
    warnings: list[str] = dataclasses.field(default_factory=list)
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)  # data path -> content hash

    def to_yaml(self) -> str:
        """The resolved spec as YAML; itself a valid spec file with the same spec_hash."""
        return f"# koe5 resolved spec, spec_hash {self.spec_hash}\n" + dump_yaml(self.data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (for `koe5-run --dry-run --json`)."""
        return {"name": self.spec.name, "spec_hash": self.spec_hash, "sweep_values": self.sweep_values,
                "source_path": str(self.source_path) if self.source_path else None,
                "warnings": self.warnings, "spec": self.data, "deepspeed": self.deepspeed_config()}

    def deepspeed_config(self, world_size: int | None = None) -> dict[str, Any]:
        return deepspeed_config(self.spec, world_size or total_ranks(self.spec))

    def freeze(self, path: str | Path) -> Path:
        """Write the file every rank reads. It carries the fingerprints, so ranks never re-hash data."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        frozen = {FROZEN_MARK: 1, "spec_hash": self.spec_hash, "sweep_values": self.sweep_values,
                  "source_path": str(self.source_path) if self.source_path else None,
                  "fingerprints": self.fingerprints, "spec": self.data}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("# Frozen by koe5: ranks read this file as is. Do not edit.\n" + dump_yaml(frozen),
                       encoding="utf-8")
        tmp.replace(path)  # atomic: a rank never sees half a file
        return path


def expand(path: str | Path, overrides: Sequence[str] = (), *, check_devices: bool = True) -> list[ResolvedSpec]:
    """Load a spec file, apply overrides, validate everything, expand the sweep. Raises SpecError.

    check_devices=False is for specs that run on another machine (--dry-run, --emit): it skips the checks
    against this machine's GPUs/CPUs and reports data or benchmark paths missing here as warnings.
    """
    path = Path(path)
    raw, origins = load_chain(path)
    return _expand(raw, origins, overrides, path, check_devices)


def expand_text(text: str, overrides: Sequence[str] = (), *, source: str = "<spec>",
                check_devices: bool = True) -> list[ResolvedSpec]:
    """expand() for a spec held as text (a run's stored spec_yaml); relative paths resolve against the cwd."""
    raw, positions = parse_yaml(text, source)
    if not isinstance(raw, dict):
        raise SpecError([("", f"{source}: a spec must be a mapping of keys")], source)
    if "base" in raw:
        raise SpecError([("base", f"{source}: `base:` is only allowed in spec files")], source)
    origins = {p: Origin(label, Path.cwd()) for p, label in positions.items()}
    return _expand(raw, origins, overrides, None, check_devices, source)


def _expand(raw: dict, origins: Origins, overrides: Sequence[str], path: Path | None,
            check_devices: bool, source: str | None = None) -> list[ResolvedSpec]:
    source = source or str(path)
    cwd = Path.cwd()
    errors: list[tuple[str, str]] = []
    for item in overrides:
        message = apply_override(raw, origins, item, cwd)
        if message:
            errors.append((item.split("=", 1)[0].strip(), message))

    axes = _sweep_axes(raw.pop("sweep", None), origins, errors, cwd)
    grid = list(itertools.product(*[[(key, tokens, j, v) for j, v in enumerate(values)]
                                    for key, tokens, values in axes]))
    members: list[tuple[dict, Spec, list[str], Origins]] = []
    seen: dict[tuple[str, str], list[int]] = {}
    for m, choice in enumerate(grid):
        member_errors: list[tuple[str, str]] = []
        elsewhere: list[str] | None = None if check_devices else []
        spec, member_origins = _member(raw, origins, choice, member_errors, cwd, elsewhere)
        members.append(({k: v for k, _, _, v in choice}, spec, elsewhere or [], member_origins))
        for error in member_errors:
            seen.setdefault(error, []).append(m)
    for (key, message), where in seen.items():
        if len(grid) > 1 and len(where) < len(grid) and not key.startswith("sweep."):
            # Name only the swept values shared by every failing member: they are the cause.
            first = members[where[0]][0]
            common = {k: v for k, v in first.items() if all(members[m][0][k] == v for m in where)} or first
            values = ", ".join(f"{k}={v!r}" for k, v in common.items())
            message += f" (in the sweep members with {values})"
        errors.append((key, message))
    if errors:
        raise SpecError(errors, source)

    for _, spec, warnings, member_origins in members:
        if check_devices:
            validate.check_devices(spec, errors, warnings, member_origins)
        else:  # meant for another machine: what this machine's devices refuse is only a warning
            here: list[tuple[str, str]] = []
            validate.check_devices(spec, here, warnings, member_origins)
            warnings.extend(f"{key}: {message} (on this machine; it must hold where the run starts)"
                            for key, message in here)
    if errors:
        raise SpecError(list(dict.fromkeys(errors)), source)

    prints: dict[str, str] = {}
    out = []
    for sweep_values, spec, warnings, _ in members:
        data = dataclasses.asdict(spec)
        for _, file in data_paths(data):
            if file not in prints:
                # Only a spec checked for another machine can name a path that is not here.
                # A hub dataset is named, not hashed: its content is whatever the hub serves.
                if is_hub_id(file):
                    prints[file] = file
                else:
                    prints[file] = fingerprint(file) if Path(file).exists() else f"missing:{file}"
        own = {file: prints[file] for _, file in data_paths(data)}
        out.append(ResolvedSpec(spec, data, spec_hash(data, own), sweep_values, path,
                                list(dict.fromkeys(warnings)), own))
    return out


def _sweep_axes(sweep: Any, origins: Origins, errors: list, cwd: Path) -> list[tuple[str, list, list]]:
    """[(key path, parsed tokens, values)] of a `sweep:` mapping; problems go to errors."""
    if sweep is None:
        return []
    label = origins["sweep"].label + ": " if "sweep" in origins else ""
    if not isinstance(sweep, dict):
        errors.append(("sweep", f"{label}expected a mapping from key path to a list of values, "
                                f"for example `train.batch_size: [32, 64]`"))
        return []
    axes = []
    for key, values in sweep.items():
        where = origins.get(f"sweep.{key}", Origin("sweep", cwd)).label
        tokens, _, message = check_path(str(key), where)
        if message:
            errors.append((f"sweep.{key}", message))
            continue
        if not isinstance(values, list) or not values:
            errors.append((f"sweep.{key}", f"{where}: expected a non-empty list of values, found {values!r}"))
            continue
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            errors.append((f"sweep.{key}", f"{where}: values {repeated} repeat; each sweep member must differ"))
            continue
        axes.append((str(key), tokens, values))
    return axes


def _member(raw: dict, origins: Origins, choice, errors: list, cwd: Path,
            elsewhere: list[str] | None = None) -> tuple[Spec, Origins]:
    """Validate one concrete spec (raw with one value per sweep axis set)."""
    data = copy.deepcopy(raw)
    origins = dict(origins)
    for key, tokens, j, value in choice:
        # Point errors in a swept value at the line of that value in the sweep list.
        origin = origins.get(f"sweep.{key}[{j}]") or origins.get(f"sweep.{key}") or Origin("sweep", cwd)
        message = set_path(data, tokens, copy.deepcopy(value), origins, origin)
        if message:
            errors.append((f"sweep.{key}[{j}]", f"{origin.label}: {message}"))
    data = interpolate(data, errors, origins)
    spec = validate.build(Spec, data, "", errors, origins)
    validate.resolve_paths(spec, origins, cwd)
    validate.check_rules(spec, errors, origins, elsewhere)
    # A value that came from the sweep is reported under the sweep key that set it.
    swept = {key: f"sweep.{key}[{j}]" for key, _, j, _ in choice}
    for i, (path, message) in enumerate(errors):
        for key, name in swept.items():
            if path == key or path.startswith(key + ".") or path.startswith(key + "["):
                errors[i] = (name + path[len(key):], message)
    return spec, origins


def spec_from_dict(d: dict, *, source: str = "<dict>") -> Spec:
    """A strict Spec from a resolved dict (a frozen or stored spec): no base, no sweep, no overrides."""
    errors: list[tuple[str, str]] = []
    if not isinstance(d, dict):
        raise SpecError([("", f"expected a mapping, found {type(d).__name__}")], source)
    spec = validate.build(Spec, d, "", errors, {})
    validate.resolve_paths(spec, {}, Path.cwd())
    validate.check_rules(spec, errors, {})
    if errors:
        raise SpecError(errors, source)
    return spec


def load_frozen(path: str | Path) -> ResolvedSpec:
    """Read a file written by ResolvedSpec.freeze(). Nothing is re-composed and no data is re-hashed."""
    path = Path(path)
    frozen, _ = load_yaml_file(path)
    if not isinstance(frozen, dict) or frozen.get(FROZEN_MARK) != 1:
        raise SpecError([("", f"{path} was not written by ResolvedSpec.freeze()")], path)
    spec = spec_from_dict(frozen["spec"], source=str(path))
    data = dataclasses.asdict(spec)
    fingerprints = frozen.get("fingerprints") or {}
    missing = [p for _, p in data_paths(data) if p not in fingerprints]
    if missing:
        raise SpecError([("", f"{path}: no fingerprint for {missing}; re-freeze the spec")], path)
    digest = spec_hash(data, fingerprints)
    if digest != frozen.get("spec_hash"):
        raise SpecError([("", f"{path}: content hash {digest} does not match the recorded spec_hash "
                              f"{frozen.get('spec_hash')}; the file was edited after freezing")], path)
    source = frozen.get("source_path")
    return ResolvedSpec(spec, data, digest, frozen.get("sweep_values") or {}, Path(source) if source else None,
                        [], {p: fingerprints[p] for _, p in data_paths(data)})

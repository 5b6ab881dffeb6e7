"""Experiment specs: schema, loading, validation, overrides, sweeps and content identity.

    from koe5.spec import expand, load_frozen, SpecError
    for rs in expand("experiments/x.yaml", ["train.lr=1e-4"]):
        print(rs.spec_hash, rs.sweep_values)

Importing this package never imports torch; only device checks on a valid spec do.
"""

from koe5.spec.errors import SpecError
from koe5.spec.load import ResolvedSpec, expand, expand_text, load_frozen, spec_from_dict
from koe5.spec.schema import Spec

__all__ = ["SpecError", "ResolvedSpec", "Spec", "expand", "expand_text", "load_frozen", "spec_from_dict"]

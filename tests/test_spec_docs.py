"""docs/spec.md is generated from the schema; this fails when someone changes one without the other."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from koe5.spec import introspect, schema
from koe5.spec.docs import generate

DOC = Path(__file__).resolve().parents[1] / "docs" / "spec.md"


def test_docs_spec_md_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == generate(), \
        "docs/spec.md is stale: run `python -m koe5.spec.docs > docs/spec.md`"


def test_every_key_has_a_type_a_default_and_a_description():
    text = generate()
    for path in introspect.all_key_paths():
        assert f"| `{path.replace('[0]', '[]')}` |" in text, path
    for cls in (schema.Spec, schema.ModelSpec, schema.SourceSpec, schema.DataSpec, schema.LossSpec, schema.CacheSpec,
                schema.TrainSpec, schema.DeepSpeedSpec, schema.LaunchSpec, schema.BenchmarkSpec, schema.EvalSpec,
                schema.RegistrySpec):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc", "").strip(), f"{cls.__name__}.{f.name} has no description"


def test_enumerations_are_closed():
    t = introspect.fields_of
    assert "one of 0 | 1 | 2 | 3" in introspect.describe_type(t(schema.DeepSpeedSpec)["zero_stage"][0])
    for cls, key in ((schema.LossSpec, "name"), (schema.ModelSpec, "pooling"), (schema.TrainSpec, "precision"),
                     (schema.LaunchSpec, "backend")):
        assert introspect.describe_type(t(cls)[key][0]).startswith("one of "), key

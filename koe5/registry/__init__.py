"""The run registry: every run, its provenance, metrics, training curve and artifacts, in one DuckDB file.

    from koe5.registry import Registry
    reg = Registry()                      # $KOE5_REGISTRY or <repo>/registry/koe5.duckdb
    run_id = reg.create_run(name, spec_hash, spec_yaml)
    reg.set_status(run_id, "running"); reg.heartbeat(run_id); reg.set_status(run_id, "finished")
"""

from koe5.registry.connect import RegistryError, default_registry_path
from koe5.registry.store import METRICS, STATUSES, Registry, effective_status, parse_metric

__all__ = ["Registry", "RegistryError", "default_registry_path", "effective_status", "parse_metric",
           "METRICS", "STATUSES"]

"""Model repository: scanning ``<root>/<model>/<version>/``, per-model config, version policies."""

from dl_inference.repository.config import (
    SUPPORTED_BACKENDS,
    backend_name,
    default_model_filename,
    instance_count,
    instance_kinds,
    load_model_config,
    validate_config,
)
from dl_inference.repository.scan import (
    ModelSource,
    resolve_inside,
    scan_model,
    scan_repository,
    validate_model_name,
)
from dl_inference.repository.versions import list_versions, select_versions

__all__ = [
    "SUPPORTED_BACKENDS",
    "ModelSource",
    "backend_name",
    "default_model_filename",
    "instance_count",
    "instance_kinds",
    "list_versions",
    "load_model_config",
    "resolve_inside",
    "scan_model",
    "scan_repository",
    "select_versions",
    "validate_config",
    "validate_model_name",
]

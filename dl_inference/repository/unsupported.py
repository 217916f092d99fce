"""Model-config settings this server does not implement: a clear load error, never silently ignored.

A Triton repository may set things a stateful, ensemble or cached model needs to be right; serving such
a model as if they were absent gives wrong answers with no error. So every setting here fails the
load, all of them named in one message, until the feature that honours it lands (and takes it off
this list). Hints that change nothing about the answers and that the backends already follow
(``input_pinned_memory`` / ``output_pinned_memory``, an input's ``format``) are accepted.
"""

from __future__ import annotations

from dl_inference.errors import InvalidArgument
from dl_inference.protocol.generated.model_config_pb2 import ModelConfig, ModelOptimizationPolicy


def unsupported_settings(config: ModelConfig) -> list[str]:
    """The settings of ``config`` this server would not honour, as the config spells them."""
    found: list[str] = []
    if config.HasField("sequence_batching"):
        found.append("sequence_batching (stateful models)")
    if config.HasField("ensemble_scheduling"):
        found.append("ensemble_scheduling (ensemble pipelines)")
    if config.response_cache.enable:
        found.append("response_cache { enable: true }")
    if config.model_transaction_policy.decoupled:
        found.append("model_transaction_policy { decoupled: true }")
    if config.batch_input or config.batch_output:
        found.append("batch_input / batch_output (ragged batching)")
    if config.model_repository_agents.agents:
        found.append("model_repository_agents")
    if config.HasField("model_operations") and config.model_operations.op_library_filename:
        found.append("model_operations (custom operation libraries)")
    if config.runtime:
        found.append(f"runtime '{config.runtime}'")
    if config.cc_model_filenames:
        found.append("cc_model_filenames")
    if config.metric_tags or config.HasField("model_metrics"):
        found.append("metric_tags / model_metrics")
    for i, group in enumerate(config.instance_group):
        label = f"instance_group '{group.name or i}'"
        for field, set_ in (
            ("rate_limiter", group.HasField("rate_limiter")),
            ("secondary_devices", bool(group.secondary_devices)),
            ("profile", bool(group.profile)),
            ("passive", group.passive),
            ("host_policy", bool(group.host_policy)),
        ):
            if set_:
                found.append(f"{label} {field}")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for t in tensors:
            for field in ("allow_ragged_batch", "is_shape_tensor", "is_non_linear_format_io"):
                if getattr(t, field, False):
                    found.append(f"{kind} '{t.name}' {field}")
    found += [f"optimization {name}" for name in _optimization(config.optimization)]
    return found


def _optimization(policy: ModelOptimizationPolicy) -> list[str]:
    names = []
    if policy.graph.level:
        names.append("graph")
    if policy.priority != ModelOptimizationPolicy.PRIORITY_DEFAULT:
        names.append("priority")
    cuda = policy.cuda
    if cuda.graphs or cuda.busy_wait_events or cuda.graph_spec or cuda.output_copy_stream:
        names.append("cuda")
    accelerators = policy.execution_accelerators
    if accelerators.gpu_execution_accelerator or accelerators.cpu_execution_accelerator:
        names.append("execution_accelerators")
    if policy.gather_kernel_buffer_threshold:
        names.append("gather_kernel_buffer_threshold")
    if policy.eager_batching:
        names.append("eager_batching")
    return names


def check_supported(config: ModelConfig) -> None:
    """InvalidArgument naming the model and every setting this server would not honour."""
    found = unsupported_settings(config)
    if found:
        raise InvalidArgument(
            f"model '{config.name or '<unnamed>'}': this server does not implement {'; '.join(found)} "
            "(refused rather than ignored: the model would not behave as configured)"
        )

"""Submit and schedule compiled pipelines on a Kubeflow Pipelines (v2) cluster, and place GPU tasks.

Thin wrappers over ``kfp.Client`` so that ``customcrafter pipeline submit/schedule`` and the docs'
``kfp run create ...`` do the same thing. Credentials: a bearer token passed in or read from the
``KFP_TOKEN`` environment variable (fill it from your identity provider or a Kubernetes Secret); never from
a file in the repository.

The GPU placement settings mirror ``k8s/base/gpu-scheduling-configmap.yaml`` (a test keeps the two equal):
pipelines call :func:`apply_gpu_scheduling` on their train/sample/evaluate tasks, with
``CompileSettings.gpu_scheduling`` (default: this mirror).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from customcrafter.config import StrictModel
from customcrafter.orchestration.settings import PIPELINE_SERVICE_ACCOUNT
from customcrafter.training.method_names import check_methods

__all__ = [
    "KFP_TOKEN_ENV",
    "KfpError",
    "CronError",
    "GpuScheduling",
    "DEFAULT_GPU_SCHEDULING",
    "make_client",
    "health",
    "submit_run",
    "schedule_retraining",
    "to_kfp_cron",
    "gpu_scheduling_from_configmap",
    "apply_gpu_scheduling",
]

logger = logging.getLogger(__name__)

KFP_TOKEN_ENV = "KFP_TOKEN"


class KfpError(RuntimeError):
    """The KFP API refused or failed a request; the message names the host and the operation."""


class CronError(ValueError):
    """A cron expression is not valid for KFP's scheduler; the message names the field and the reason."""


# --------------------------------------------------------------------------------------------- cron
# KFP's ScheduledWorkflow controller uses robfig/cron with a leading seconds field:
# "SEC MIN HOUR DOM MON DOW". People write the classic 5-field form; we accept both.
_CRON_FIELDS = [  # name, low, high, names allowed
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate(
        "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}),
    ("day-of-week", 0, 6, {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}),
]
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_EVERY = re.compile(r"^@every\s+(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _cron_value(text: str, field: str, low: int, high: int, names: dict[str, int], expr: str) -> int:
    value = names.get(text.upper()) if not text.isdigit() else int(text)
    if value is None:
        raise CronError(f"cron {expr!r}: {field} field: {text!r} is not a number" +
                        (f" or one of {', '.join(names)}" if names else ""))
    if not low <= value <= high:
        raise CronError(f"cron {expr!r}: {field} field: {value} is outside {low}-{high}")
    return value


def _check_cron_field(part: str, field: str, low: int, high: int, names: dict[str, int], expr: str) -> None:
    for item in part.split(","):
        base, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise CronError(f"cron {expr!r}: {field} field: step {step!r} must be a positive integer")
        if base in ("*", "?"):
            if base == "?" and field not in ("day-of-month", "day-of-week"):
                raise CronError(f"cron {expr!r}: {field} field: '?' is only allowed for day-of-month/week")
            continue
        start, dash, end = base.partition("-")
        first = _cron_value(start, field, low, high, names, expr)
        if dash and _cron_value(end, field, low, high, names, expr) < first:
            raise CronError(f"cron {expr!r}: {field} field: range {base!r} runs backwards")


def to_kfp_cron(expr: str) -> str:
    """Validate a cron expression and return KFP's 6-field form (seconds first).

    5 fields (``"0 3 * * *"``) get ``"0 "`` prefixed; 6 fields are checked as they are; robfig's
    descriptors (``@daily``, ``@every 6h``) pass through (``@DAILY`` lower-cased: robfig matches them by case).
    Runs of spaces become one. Given its own result it returns it unchanged, so the result is exactly what
    :func:`schedule_retraining` sends. (KFP would take a 5-field expression as it is, read as SEC MIN HOUR DOM
    MON: ``0 3 * * *`` would run every hour at minute 3.)
    """
    text = " ".join(str(expr).split())
    if not text:
        raise CronError("cron expression is empty")
    if text.startswith("@"):
        if text.lower() in _DESCRIPTORS or _EVERY.match(text):
            return text.lower() if text.lower() in _DESCRIPTORS else text
        raise CronError(f"cron {expr!r}: unknown descriptor (use {', '.join(sorted(_DESCRIPTORS))} or '@every 6h')")
    parts = text.split(" ")
    if len(parts) == 5:
        parts = ["0", *parts]
    elif len(parts) != 6:
        raise CronError(f"cron {expr!r}: expected 5 fields (MIN HOUR DOM MON DOW) or 6 (SEC first), "
                        f"got {len(parts)}")
    for part, (field, low, high, names) in zip(parts, _CRON_FIELDS, strict=True):
        _check_cron_field(part, field, low, high, names, expr)
    return " ".join(parts)


# ------------------------------------------------------------------------------------------- client
def _token(existing_token: str | None) -> str | None:
    return existing_token or os.environ.get(KFP_TOKEN_ENV) or None


def make_client(host: str, namespace: str | None = None, existing_token: str | None = None):
    """A ``kfp.Client`` for ``host`` with the bearer token from the argument or ``$KFP_TOKEN``."""
    import kfp

    kwargs: dict[str, Any] = {"host": host.rstrip("/"), "existing_token": _token(existing_token)}
    if namespace:
        kwargs["namespace"] = namespace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP >= 2.0.0-beta.2": we know
        try:
            return kfp.Client(**kwargs)
        except Exception as exc:  # connection errors surface here when the client probes healthz
            raise KfpError(f"KFP at {host}: cannot connect ({exc})") from exc


def _call(host: str, what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise KfpError(f"KFP at {host}: {what} failed: {exc}") from exc


def health(host: str, existing_token: str | None = None) -> dict[str, Any]:
    """``GET /apis/v2beta1/healthz`` as a dict (``multi_user``, ...); raises :class:`KfpError` when down."""
    client = make_client(host, existing_token=existing_token)
    response = _call(host, "healthz", client._healthz_api.healthz_service_get_healthz)
    return response.to_dict()


#: the package formats kfp.Client accepts
_PACKAGE_SUFFIXES = (".yaml", ".yml", ".tar.gz", ".tgz", ".zip")


def _check_package(pipeline_package: str | Path) -> Path:
    path = Path(pipeline_package)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline_package: {path} does not exist (compile the pipeline first)")
    if not path.name.endswith(_PACKAGE_SUFFIXES):
        raise ValueError(f"pipeline_package: {path} is not a compiled pipeline ({', '.join(_PACKAGE_SUFFIXES)})")
    return path


def _root_parameters(path: Path) -> dict[str, dict] | None:
    """The compiled pipeline's parameters (``root.inputDefinitions.parameters`` of its IR YAML: name → definition,
    with its ``parameterType``); None for a .tar.gz/.zip package (not checked here: the server checks it)."""
    if path.suffix not in (".yaml", ".yml"):
        return None
    try:
        spec = next(iter(yaml.safe_load_all(path.read_text())), None) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"pipeline_package: {path} is not valid YAML: {exc}") from None
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise ValueError(f"pipeline_package: {path} is not a compiled KFP pipeline (no pipelineInfo/root; "
                         "compile one with `customcrafter pipeline compile`)")
    return dict(((spec.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {})


#: IR parameter types → (a check of a JSON-decoded argument value, how to say what it must be)
_PARAMETER_TYPES = {
    "STRING": (lambda v: isinstance(v, str), "a string"),
    "NUMBER_INTEGER": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "NUMBER_DOUBLE": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "BOOLEAN": (lambda v: isinstance(v, bool), "true or false"),
    "LIST": (lambda v: isinstance(v, list), "a JSON list"),
    "STRUCT": (lambda v: isinstance(v, dict), "a JSON object"),
}


def _check_arguments(path: Path, arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` unchanged, or a ValueError naming the parameters the pipeline does not take (KFP would
    drop or refuse them on the server and run with the defaults), a value of the wrong type, or a ``methods`` list
    with a name that is no training method (the run would fail in its train task)."""
    valid = _root_parameters(path)
    if valid is None:
        return _check_methods_argument(arguments)
    unknown = sorted(set(arguments) - set(valid))
    if unknown:
        hint = " (subject=dog is a shorthand of `customcrafter pipeline submit --param`; pass subjects=[\"dog\"])" \
            if "subject" in unknown and "subjects" in valid else ""
        raise ValueError(f"arguments: {path.name} has no parameter {', '.join(map(repr, unknown))}{hint}; "
                         f"its parameters: {', '.join(sorted(valid)) or 'none'}")
    for name, value in arguments.items():  # the run would fail on the cluster when its driver reads the value
        kind = (valid[name] or {}).get("parameterType")
        accepts, expected = _PARAMETER_TYPES.get(kind, (None, ""))
        if accepts is not None and not accepts(value):
            raise ValueError(f"arguments: {name}={value!r} is not {expected}, as {path.name} declares it ({kind})")
    return _check_methods_argument(arguments)


def _check_methods_argument(arguments: dict[str, Any]) -> dict[str, Any]:
    if "methods" in arguments:
        check_methods(arguments["methods"], argument="arguments: methods")
    return arguments


def submit_run(host: str, pipeline_package: str | Path, arguments: dict[str, Any] | None = None,
               experiment: str = "customcrafter", run_name: str | None = None,
               namespace: str | None = None, existing_token: str | None = None,
               service_account: str | None = PIPELINE_SERVICE_ACCOUNT) -> str:
    """Create a run of a compiled pipeline (IR YAML) in ``experiment`` (created if missing); return its id.

    Same as ``kfp --endpoint HOST run create -e EXPERIMENT -f PACKAGE key=value ...``. Argument names must be
    parameters of the compiled pipeline (a ValueError listing them otherwise, before the server is called).
    The run's pods use ``service_account`` (default: the pipeline runner of k8s/; None or "": KFP's default).
    """
    path = _check_package(pipeline_package)
    arguments = _check_arguments(path, dict(arguments or {}))
    client = make_client(host, namespace=namespace, existing_token=existing_token)
    result = _call(host, f"submitting {path.name}", client.create_run_from_pipeline_package,
                   str(path), arguments=arguments, run_name=run_name or path.stem,
                   experiment_name=experiment, namespace=namespace, service_account=service_account or None)
    logger.info("submitted %s to %s as run %s (experiment %s)", path.name, host, result.run_id, experiment)
    return result.run_id


def schedule_retraining(host: str, pipeline_package: str | Path, cron: str,
                        experiment: str = "customcrafter", job_name: str = "retrain-new-subjects",
                        arguments: dict[str, Any] | None = None, max_concurrency: int = 1,
                        enabled: bool = True, namespace: str | None = None,
                        existing_token: str | None = None,
                        service_account: str | None = PIPELINE_SERVICE_ACCOUNT) -> str:
    """Create a recurring run of a compiled pipeline on a cron schedule; return the recurring run id.

    ``cron`` may have 5 fields (classic) or 6 (KFP's, seconds first); KFP gets ``to_kfp_cron(cron)``.
    ``max_concurrency=1`` keeps a slow retraining from overlapping the next one. Same as
    ``kfp recurring-run create``. The runs' pods use ``service_account``, as in :func:`submit_run`.
    """
    kfp_cron = to_kfp_cron(cron)
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
    path = _check_package(pipeline_package)
    arguments = _check_arguments(path, dict(arguments or {}))
    client = make_client(host, namespace=namespace, existing_token=existing_token)
    exp = _call(host, f"getting/creating experiment {experiment!r}", client.create_experiment,
                experiment, namespace=namespace)
    recurring = _call(host, f"scheduling {path.name}", client.create_recurring_run,
                      experiment_id=exp.experiment_id, job_name=job_name, cron_expression=kfp_cron,
                      max_concurrency=max_concurrency, params=arguments,
                      pipeline_package_path=str(path), enabled=enabled, no_catchup=True,
                      service_account=service_account or None)
    logger.info("scheduled %s on %s as %s (cron %r)", path.name, host, recurring.recurring_run_id, kfp_cron)
    return recurring.recurring_run_id


# ------------------------------------------------------------------------------------ GPU placement
class GpuScheduling(StrictModel):
    """Where GPU tasks run and which cache they mount (mirror of the ``customcrafter-gpu-scheduling`` ConfigMap)."""

    gpu_resource: str = Field("nvidia.com/gpu", description="extended resource name of the GPUs")
    node_selector_key: str = Field("nvidia.com/gpu.present", description="node label GPU nodes carry")
    node_selector_value: str = Field("true", description="value of that label")
    toleration_key: str = Field("nvidia.com/gpu", description="taint key on GPU nodes")
    toleration_operator: str = Field("Exists", description="Exists or Equal")
    toleration_effect: str = Field("NoSchedule", description="taint effect tolerated")
    model_cache_pvc: str = Field("customcrafter-model-cache", description="PVC with base-model weights")
    model_cache_mount_path: str = Field("/cache", description="where it is mounted (HF_HOME below it)")


DEFAULT_GPU_SCHEDULING = GpuScheduling()


def gpu_scheduling_from_configmap(path: str | Path) -> GpuScheduling:
    """Read the ConfigMap (``k8s/base/gpu-scheduling-configmap.yaml`` or a rendered overlay's copy)."""
    path = Path(path)
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == "customcrafter-gpu-scheduling":
            return GpuScheduling(**{k.replace("-", "_"): v for k, v in doc.get("data", {}).items()})
    raise ValueError(f"{path}: no ConfigMap named customcrafter-gpu-scheduling")


def apply_gpu_scheduling(task, gpus: int, scheduling: GpuScheduling = DEFAULT_GPU_SCHEDULING,
                         mount_cache: bool = True):
    """Ask for ``gpus`` GPUs, pin the task to GPU nodes, tolerate their taint and mount the model cache."""
    from kfp import kubernetes

    if gpus < 0:
        raise ValueError(f"gpus: must be >= 0, got {gpus}")
    if gpus:
        task.set_accelerator_type(scheduling.gpu_resource).set_accelerator_limit(gpus)
        kubernetes.add_node_selector(task, label_key=scheduling.node_selector_key,
                                     label_value=scheduling.node_selector_value)
        kubernetes.add_toleration(task, key=scheduling.toleration_key,
                                  operator=scheduling.toleration_operator, effect=scheduling.toleration_effect)
    if mount_cache:
        kubernetes.mount_pvc(task, pvc_name=scheduling.model_cache_pvc,
                             mount_path=scheduling.model_cache_mount_path)
    return task

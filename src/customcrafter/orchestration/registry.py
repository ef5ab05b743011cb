"""Model registry: one registered model per subject, aliases moved by a metric gate, retrain bookkeeping.

* ``customcrafter-<subject>`` holds one version per training of that subject (an MLflow pyfunc, see
  :mod:`customcrafter.orchestration.pyfunc`), tagged with the DVC data revision, git commit, base model id,
  method and subject hash, and with its evaluation metrics as ``metric.<name>`` tags (so the gate compares
  versions without reading runs).
* Alias ``challenger`` always points at the newest version; ``champion`` moves only when the new version
  passes the :class:`PromotionGate` against the current champion (the first version is champion outright).
* :func:`registered_subject_versions` + :func:`subjects_to_retrain` tell the scheduled retraining which
  subjects are new or changed at a data revision.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from customcrafter.config import StrictModel

__all__ = [
    "MODEL_PREFIX",
    "CHAMPION",
    "CHALLENGER",
    "REQUIRED_TAGS",
    "GateRule",
    "PromotionGate",
    "RegistrationResult",
    "model_name",
    "register_subject_model",
    "registered_subject_versions",
    "subjects_to_retrain",
]

logger = logging.getLogger(__name__)

MODEL_PREFIX = "customcrafter-"
CHAMPION = "champion"
CHALLENGER = "challenger"
REQUIRED_TAGS = ("data_revision", "git_commit", "method", "subject_hash")
_METRIC_TAG = "metric."
_SUBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class GateRule(StrictModel):
    """The candidate's ``metric`` must not be worse than the champion's by more than ``tolerance``."""

    metric: str = Field(description="metric name as evaluated, e.g. dino_i, clip_t, motion")
    higher_is_better: bool = Field(True, description="direction of improvement")
    tolerance: float = Field(0.0, ge=0.0, description="absolute slack allowed in the worse direction")

    def check(self, candidate: float, champion: float) -> bool:
        if self.higher_is_better:
            return candidate >= champion - self.tolerance
        return candidate <= champion + self.tolerance


def _default_rules() -> list[GateRule]:
    return [GateRule(metric="dino_i"), GateRule(metric="clip_t"), GateRule(metric="motion")]


class PromotionGate(StrictModel):
    """All rules must pass for ``champion`` to move (default: DINO-I, CLIP-T and motion not worse)."""

    rules: list[GateRule] = Field(default_factory=_default_rules, description="checked in order; all must pass")

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[GateRule]) -> list[GateRule]:
        names = [r.metric for r in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rules: a metric appears twice in {names}")
        return rules

    def evaluate(self, candidate: Mapping[str, float], champion: Mapping[str, float] | None) -> tuple[bool, str]:
        """(passed, reason). A metric the candidate lacks fails; one the champion lacks cannot be compared (passes)."""
        if champion is None:
            return True, "first version: no champion yet"
        failures, notes = [], []
        for rule in self.rules:
            if rule.metric not in candidate:
                failures.append(f"{rule.metric} missing from the new version's metrics")
            elif rule.metric not in champion:
                notes.append(f"{rule.metric} not recorded for the champion")
            elif not rule.check(float(candidate[rule.metric]), float(champion[rule.metric])):
                sign = ">=" if rule.higher_is_better else "<="
                bound = champion[rule.metric] - rule.tolerance if rule.higher_is_better else \
                    champion[rule.metric] + rule.tolerance
                failures.append(f"{rule.metric} {candidate[rule.metric]:.4g} is not {sign} {bound:.4g} "
                                f"(champion {champion[rule.metric]:.4g}, tolerance {rule.tolerance:g})")
        if failures:
            return False, "gate failed: " + "; ".join(failures)
        return True, "gate passed: " + ", ".join(r.metric for r in self.rules) + \
            (f" ({'; '.join(notes)})" if notes else "")


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: int
    promoted: bool
    reason: str
    run_id: str | None = None


def model_name(subject: str) -> str:
    if not _SUBJECT_NAME.match(subject):
        raise ValueError(f"subject: {subject!r} is not a valid name (letters, digits, '_', '-', '.')")
    return f"{MODEL_PREFIX}{subject}"


@contextlib.contextmanager
def _tracking(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (needed by ``log_model``) at ``tracking_uri`` for the block, then put back
    exactly what was there: the module globals *and* the env vars that ``set_tracking_uri`` also writes.
    (``mlflow.get_*_uri()`` return resolved defaults; setting those back would pin them for later clients.)"""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _version_metrics(version) -> dict[str, float]:
    return {k[len(_METRIC_TAG):]: float(v) for k, v in version.tags.items() if k.startswith(_METRIC_TAG)}


def _champion(client, name: str):
    """The version ``champion`` points at, or None when the model has no such alias yet.

    Absence is read from the model's alias map, not inferred from an exception: ``get_model_version_by_alias``
    raises the same :class:`MlflowException` for a missing alias as for a 503 or a permission error, and taking
    those as "no champion" would promote a worse version. Any registry error propagates."""
    aliases = client.get_registered_model(name).aliases
    if CHAMPION not in aliases:
        return None
    return client.get_model_version(name, str(aliases[CHAMPION]))


def _all_pages(search, *args, **kwargs) -> Iterator[Any]:
    """Every result of an MLflow ``search_*`` call: they return one page (100 registered models by default) with
    a ``token`` for the next, and stopping at the first page would hide every subject past it."""
    token = None
    while True:
        page = search(*args, page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def _check_inputs(module_dir: Path, tags: Mapping[str, Any], metrics: Mapping[str, float], subject: str,
                  base_model_id: str) -> None:
    from customcrafter.subject_module import read_module_meta

    if not module_dir.is_dir() or not any(module_dir.iterdir()):
        raise FileNotFoundError(f"module_dir: {module_dir} is missing or empty (train the subject first)")
    missing = [k for k in REQUIRED_TAGS if not str(tags.get(k, "")).strip()]
    if missing:
        raise ValueError(f"tags: missing {', '.join(missing)} (required: {', '.join(REQUIRED_TAGS)})")
    # what is registered must describe the module: a version tagged with another base model, method or subject
    # would be promoted and then fail (or mislead) wherever it is loaded
    recorded = read_module_meta(module_dir)
    for field, given in (("base_model_id", base_model_id), ("method", tags["method"]), ("subject", subject)):
        if field in recorded and str(recorded[field]) != str(given):
            raise ValueError(f"{field}: {given!r} given, but the module in {module_dir} was trained with "
                             f"{recorded[field]!r}")
    for key, value in metrics.items():
        if not isinstance(value, int | float):
            raise ValueError(f"metrics: {key}={value!r} is not a number")


def register_subject_model(tracking_uri: str, subject: str, module_dir: str | Path, base_model_id: str,
                           metrics: Mapping[str, float], tags: Mapping[str, Any],
                           gate: PromotionGate | None = None, experiment: str = "customcrafter",
                           run_id: str | None = None) -> RegistrationResult:
    """Log the subject module as a pyfunc, register it as ``customcrafter-<subject>``, set tags and aliases.

    ``run_id``: log into that (e.g. the pipeline's subject × method) run; otherwise a run named
    ``register-<subject>`` is created in ``experiment``. Returns the new version and whether it became champion.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from customcrafter import __version__ as package_version
    from customcrafter.orchestration.pyfunc import (
        SUBJECT_MODULE_ARTIFACT,
        CustomCrafterVideoModel,
        input_signature,
    )

    gate = gate or PromotionGate()
    name = model_name(subject)
    module_dir = Path(module_dir)
    _check_inputs(module_dir, tags, metrics, subject, base_model_id)
    all_tags = {**{k: str(v) for k, v in tags.items()}, "base_model_id": base_model_id, "subject": subject}
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    with _tracking(tracking_uri):
        if run_id is None:
            mlflow.set_experiment(experiment)
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"register-{subject}") as run:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            mlflow.set_tags({f"registry.{k}": v for k, v in all_tags.items()})
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=CustomCrafterVideoModel(),
                artifacts={SUBJECT_MODULE_ARTIFACT: str(module_dir.resolve())},
                model_config={"base_model_id": base_model_id, "method": all_tags["method"]},
                signature=input_signature(),
                # The project image provides these; declaring them stops MLflow from importing the model
                # (and the base weights) to guess requirements.
                pip_requirements=[f"customcrafter=={package_version}", f"mlflow=={mlflow.__version__}"],
                registered_model_name=name,
            )
    version = str(info.registered_model_version)
    client.set_registered_model_tag(name, "subject", subject)
    for key, value in all_tags.items():
        client.set_model_version_tag(name, version, key, value)
    for key, value in metrics.items():
        client.set_model_version_tag(name, version, f"{_METRIC_TAG}{key}", repr(float(value)))
    client.set_registered_model_alias(name, CHALLENGER, version)

    try:
        champion = _champion(client, name)
    except MlflowException as exc:
        raise RuntimeError(f"{name} v{version}: could not read the {CHAMPION} alias ({exc}); the version is "
                           f"{CHALLENGER} only and {CHAMPION} was left as it was (register again to gate it)") \
            from exc
    passed, reason = gate.evaluate(metrics, _version_metrics(champion) if champion else None)
    if champion is not None:
        reason = f"vs champion v{champion.version}: {reason}"
    if passed:
        client.set_registered_model_alias(name, CHAMPION, version)
    logger.info("registered %s v%s (%s): %s", name, version, "champion" if passed else "challenger", reason)
    return RegistrationResult(name=name, version=int(version), promoted=passed, reason=reason,
                              run_id=run.info.run_id)


def registered_subject_versions(tracking_uri: str, data_revision: str | None = None) -> dict[str, dict[str, Any]]:
    """``{subject: {version, subject_hash, data_revision}}``: each subject's newest version (at ``data_revision``
    if given; subjects with no version at that revision are left out)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found: dict[str, dict[str, Any]] = {}
    for model in _all_pages(client.search_registered_models, filter_string=f"name LIKE '{MODEL_PREFIX}%'"):
        versions = list(_all_pages(client.search_model_versions, f"name = '{model.name}'"))
        if data_revision is not None:
            versions = [v for v in versions if v.tags.get("data_revision") == data_revision]
        if not versions:
            continue
        newest = max(versions, key=lambda v: int(v.version))
        subject = model.tags.get("subject") or newest.tags.get("subject") or model.name[len(MODEL_PREFIX):]
        found[subject] = {"version": int(newest.version), "subject_hash": newest.tags.get("subject_hash"),
                          "data_revision": newest.tags.get("data_revision")}
    return found


def subjects_to_retrain(current: Mapping[str, str], registered: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Subjects in ``current`` (subject → content hash) that are new or whose hash differs from the registry's."""
    return sorted(s for s, digest in current.items()
                  if s not in registered or registered[s].get("subject_hash") != digest)

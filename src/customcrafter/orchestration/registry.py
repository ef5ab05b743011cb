"""Model registry: one registered model per subject, aliases moved by a metric gate, retrain bookkeeping.

* ``customcrafter-<subject>`` holds one version per training of that subject (an MLflow pyfunc, see
  :mod:`customcrafter.orchestration.pyfunc`), tagged with the DVC data revision, git commit, base model id,
  method and subject hash, and with its evaluation metrics as ``metric.<name>`` tags (so the gate compares
  versions without reading runs).
* Alias ``challenger`` always points at the newest version; ``champion`` moves only when the new version
  passes the :class:`PromotionGate` against the current champion (the first version is champion outright).
* :func:`registered_subject_versions` + :func:`subjects_to_retrain` tell the scheduled retraining which
  subjects are new or changed at a data revision.
* :func:`list_registered_versions` (``customcrafter models list``) describes every version;
  :func:`resolve_registered_module` turns ``models:/customcrafter-dog@champion`` (or ``models:/NAME/3``) into a
  local subject-module folder (``customcrafter sample --subject-module models:/...``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from customcrafter.config import StrictModel
from customcrafter.utils import scoped_environ

__all__ = [
    "MODEL_PREFIX",
    "CHAMPION",
    "CHALLENGER",
    "REQUIRED_TAGS",
    "GateRule",
    "PromotionGate",
    "RegistrationResult",
    "RegisteredVersion",
    "RegistryLookupError",
    "ResolvedModule",
    "display_error",
    "display_uri",
    "is_registry_uri",
    "list_registered_versions",
    "model_name",
    "parse_registry_uri",
    "register_subject_model",
    "registered_subject_versions",
    "resolve_registered_module",
    "subjects_to_retrain",
]

logger = logging.getLogger(__name__)

MODEL_PREFIX = "customcrafter-"
CHAMPION = "champion"
CHALLENGER = "challenger"
REQUIRED_TAGS = ("data_revision", "git_commit", "method", "subject_hash")
_METRIC_TAG = "metric."
# The UserWarning mlflow.pyfunc.log_model (3.x) gives a model logged with a signature and no input example; its text
# starts with a colour code.
_NO_INPUT_EXAMPLE_WARNING = r".*An input example was not provided when logging the model"
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

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    with scoped_environ({"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}):
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved[0])
            registry_utils._registry_uri = saved[1]


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
            with warnings.catch_warnings():
                # No input_example, on purpose: given one, log_model loads the model (the base weights) and
                # samples a video to check that the example can be served, and mlflow.pyfunc.log_model has no
                # switch to skip that. The explicit signature is what requests are checked against; MLflow's
                # reminder to add an example is silenced here only, so other warnings still show.
                warnings.filterwarnings("ignore", message=_NO_INPUT_EXAMPLE_WARNING, category=UserWarning)
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


# ------------------------------------------------------------------------------ reading the registry back
REGISTRY_URI_PREFIX = "models:/"
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")


class RegistryLookupError(LookupError):
    """A ``models:/`` URI or subject that names nothing in the registry (unknown model, alias or version, or a
    version without a subject module): the user's input, not the registry, is at fault."""


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a ``customcrafter-<subject>`` model, as its tags describe it."""

    name: str
    version: int
    aliases: tuple[str, ...]
    method: str | None
    base_model_id: str | None
    data_revision: str | None
    metrics: dict[str, float]
    tags: dict[str, str]
    run_id: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class ResolvedModule:
    """A ``models:/`` URI resolved: the registered version and the local copy of its subject module."""

    uri: str
    path: Path
    version: RegisteredVersion


def display_uri(uri: str, text: str | None = None) -> str:
    """``text`` (default: ``uri``) fit to print: the password of ``uri`` (``https://user:secret@host``), wherever it
    appears, as ``***``."""
    import urllib.parse

    text = uri if text is None else text
    try:
        password = urllib.parse.urlsplit(uri).password
    except ValueError:  # not a URL
        return text
    return text.replace(password, "***") if password else text


def display_error(exc: BaseException, uri: str = "") -> str:
    """The first line of ``exc`` (its type when it has no text), at most 300 characters, fit to print: the password
    of ``uri`` masked first (MLflow's messages quote the URL; a cut could leave part of it)."""
    text = display_uri(uri, str(exc)).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def is_registry_uri(value: str | os.PathLike) -> bool:
    return str(value).startswith(REGISTRY_URI_PREFIX)


def parse_registry_uri(uri: str) -> tuple[str, str | None, int | None]:
    """``models:/NAME@ALIAS`` → ``(NAME, ALIAS, None)``; ``models:/NAME/3`` → ``(NAME, None, 3)``."""
    match = _REGISTRY_URI.match(str(uri))
    version = match and match["version"]
    if not match or (version is not None and not (version.isdigit() and int(version) > 0)):
        raise ValueError(f"{uri}: expected models:/NAME@ALIAS (e.g. models:/customcrafter-dog@champion) or "
                         "models:/NAME/VERSION (a version number)")
    return match["name"], match["alias"], int(version) if version else None


def _describe(version, aliases: Mapping[str, Any]) -> RegisteredVersion:
    tags = dict(version.tags or {})
    return RegisteredVersion(
        name=version.name, version=int(version.version),
        aliases=tuple(sorted(a for a, v in aliases.items() if str(v) == str(version.version))),
        method=tags.get("method"), base_model_id=tags.get("base_model_id"), data_revision=tags.get("data_revision"),
        metrics=_version_metrics(version), tags=tags, run_id=version.run_id, source=version.source)


def list_registered_versions(tracking_uri: str, subject: str | None = None) -> list[RegisteredVersion]:
    """Every version of every ``customcrafter-*`` model (only ``customcrafter-<subject>`` with ``subject``), by
    name, newest version first. An empty list when nothing is registered; registry errors propagate."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    pattern = f"name = '{model_name(subject)}'" if subject is not None else f"name LIKE '{MODEL_PREFIX}%'"
    found = []
    for model in _all_pages(client.search_registered_models, filter_string=pattern):
        # aliases from the model: search_model_versions may leave a version's aliases empty
        aliases = dict(model.aliases or {}) or dict(client.get_registered_model(model.name).aliases or {})
        versions = _all_pages(client.search_model_versions, f"name = '{model.name}'")
        found += [_describe(v, aliases) for v in versions]
    return sorted(found, key=lambda v: (v.name, -v.version))


def _registered_model(client, name: str, tracking_uri: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise  # an unreachable or failing registry is not "no such model"
    known = [m.name for m in _all_pages(client.search_registered_models, filter_string=f"name LIKE '{MODEL_PREFIX}%'")]
    raise RegistryLookupError(f"no registered model {name!r} at {display_uri(tracking_uri)} (registered: "
                              f"{', '.join(known) if known else 'none'}; see `customcrafter models list`)")


def _lookup_version(client, uri: str, tracking_uri: str):
    name, alias, number = parse_registry_uri(uri)
    model = _registered_model(client, name, tracking_uri)
    aliases = dict(model.aliases or {})
    if alias is not None:
        # read from the model's alias map, as _champion does: an exception would not tell a missing alias apart
        # from a registry error
        if alias not in aliases:
            held = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryLookupError(f"{name} has no alias {alias!r} (aliases: {held})")
        number = int(aliases[alias])
    versions = {int(v.version): v for v in _all_pages(client.search_model_versions, f"name = '{name}'")}
    if number not in versions:
        raise RegistryLookupError(f"{name} has no version {number} (versions: "
                                  f"{', '.join(map(str, sorted(versions))) or 'none'})")
    return _describe(versions[number], aliases)


def registry_cache_dir() -> Path:
    """Where resolved subject modules are kept: ``$CUSTOMCRAFTER_CACHE/registry`` (default
    ``~/.cache/customcrafter/registry``, the cache root of ``customcrafter.loading``)."""
    from customcrafter.loading import default_cache_dir

    return default_cache_dir() / "registry"


def _download_subject_module(client, version: RegisteredVersion, tracking_uri: str, target: Path) -> None:
    """Only the version's ``subject_module`` artifact (not the pickled model or its environment files), found
    through the pyfunc flavour of its MLmodel, into ``target`` (written whole or not at all)."""
    import mlflow.artifacts
    import yaml

    from customcrafter.orchestration.pyfunc import SUBJECT_MODULE_ARTIFACT

    root = client.get_model_version_download_uri(version.name, str(version.version)).rstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=str(tmp / "meta"),
                                                      tracking_uri=tracking_uri)
        flavor = (yaml.safe_load(Path(mlmodel).read_text()) or {}).get("flavors", {}).get("python_function", {})
        entry = (flavor.get("artifacts") or {}).get(SUBJECT_MODULE_ARTIFACT)
        if not entry or not entry.get("path"):
            raise RegistryLookupError(f"{version.name} v{version.version} has no {SUBJECT_MODULE_ARTIFACT!r} "
                                      "artifact: not a CustomCrafter subject model")
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{entry['path'].strip('/')}",
                                                         dst_path=str(tmp / "module"), tracking_uri=tracking_uri))
        if not local.is_dir():
            raise RegistryLookupError(f"{version.name} v{version.version}: its {SUBJECT_MODULE_ARTIFACT!r} "
                                      "artifact is not a folder")
        try:
            local.rename(target)
        except OSError:
            if not target.is_dir():  # else another process resolved the same version meanwhile: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_registered_module(uri: str, tracking_uri: str, cache_dir: str | Path | None = None) -> ResolvedModule:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → the version and a local copy of its subject module.

    The copy is kept under ``cache_dir`` (default :func:`registry_cache_dir`), keyed by the registry, name, version
    and source, so a second use downloads nothing. A version's artifacts do not change, so a cached copy is not
    stale; an alias that moves resolves to another version and another folder.
    Raises :class:`RegistryLookupError` when the URI names nothing, ``ValueError`` for a malformed URI; registry
    errors (unreachable server, permissions) propagate as MLflow raised them."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = _lookup_version(client, uri, tracking_uri)
    key = hashlib.sha256(f"{tracking_uri}|{version.name}|{version.version}|{version.source}".encode()).hexdigest()
    target = Path(cache_dir or registry_cache_dir()) / f"{version.name}-v{version.version}-{key[:16]}"
    if not target.is_dir():
        _download_subject_module(client, version, tracking_uri, target)
        logger.info("%s: %s v%s downloaded to %s", uri, version.name, version.version, target)
    return ResolvedModule(uri=str(uri), path=target, version=version)

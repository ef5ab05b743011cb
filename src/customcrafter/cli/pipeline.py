"""`customcrafter pipeline` commands: compile, submit, schedule, run-local, prune-checkpoints (KFP v2)."""

from __future__ import annotations

from pathlib import Path

import typer

from customcrafter.cli import UserError, app
from customcrafter.orchestration.settings import (
    COMPILED_DIR,
    DEFAULT_EXPERIMENT,
    DEFAULT_METHODS,
    PIPELINE_SERVICE_ACCOUNT,
)
from customcrafter.training.method_names import METHODS

pipeline_app = typer.Typer(no_args_is_help=True, help="Kubeflow pipeline: compile, submit, schedule, run locally, "
                                                        "prune checkpoints.")
app.add_typer(pipeline_app, name="pipeline")

_PARAM_HELP = ("pipeline parameter KEY=VALUE, repeatable (JSON values: seeds=[0,1]; subject=dog or "
               "subjects=dog,cat; methods=customcrafter,dreamvideo; config_overrides='{\"train.steps\": 400}'); "
               "parameter names, method names and override fields are checked before submitting")
_SA_HELP = "Kubernetes ServiceAccount the run's pods use (k8s/base/pipeline-runner-rbac.yaml); '' for KFP's default"


@pipeline_app.command("compile")
def compile_cmd(
    output_dir: Path = typer.Option(COMPILED_DIR, "--output-dir", "--out", "-o", help="where the IR YAML files go"),
    train_gpus: int = typer.Option(None, "--train-gpus", min=0, help="GPUs of each train task (default 4, or "
                                                              "$CUSTOMCRAFTER_TRAIN_GPUS)"),
    gpu_scheduling: Path = typer.Option(None, "--gpu-scheduling", help="YAML holding the customcrafter-gpu-"
                                        "scheduling ConfigMap (an edited k8s/base/gpu-scheduling-configmap.yaml or "
                                        "`kubectl kustomize` output): GPU node placement and model cache PVC "
                                        "(default: the k8s/base one)"),
    image: str = typer.Option(None, "--image", help="container image of every task (default: the project image "
                                                    "of this version, e.g. a mirror of it)"),
) -> None:
    """Compile pipelines/*.py to IR YAML (customcrafter_pipeline.yaml, retrain_new_subjects.yaml)."""
    from dataclasses import replace

    from customcrafter.orchestration.kfp_client import gpu_scheduling_from_configmap
    from customcrafter.orchestration.local_run import compile_pipelines
    from customcrafter.orchestration.settings import compile_settings

    settings = compile_settings()
    if train_gpus is not None:
        settings = replace(settings, train_gpus=train_gpus)
    if image is not None:
        if not image.strip() or image.strip().endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]:
            raise UserError(f"--image: {image!r} is not a pinned image (NAME:TAG other than latest, or NAME@DIGEST)")
        settings = replace(settings, image=image.strip())
    if gpu_scheduling is not None:
        try:
            settings = replace(settings, gpu_scheduling=gpu_scheduling_from_configmap(gpu_scheduling))
        except (OSError, ValueError) as exc:
            raise UserError(f"--gpu-scheduling: {exc}") from None
    for path in compile_pipelines(output_dir, settings):
        typer.echo(f"compiled {path}")


@pipeline_app.command("submit")
def submit_cmd(
    host: str = typer.Option(..., "--host", help="KFP API endpoint, e.g. http://localhost:8080"),
    experiment: str = typer.Option(DEFAULT_EXPERIMENT, "--experiment", "-e"),
    param: list[str] = typer.Option([], "--param", "-p", help=_PARAM_HELP),
    package: Path = typer.Option(COMPILED_DIR / "customcrafter_pipeline.yaml", "--package", "-f",
                                 help="compiled pipeline"),
    run_name: str = typer.Option(None, "--run-name"),
    namespace: str = typer.Option(None, "--namespace"),
    service_account: str = typer.Option(PIPELINE_SERVICE_ACCOUNT, "--service-account", help=_SA_HELP),
) -> None:
    """Submit a run (same as `kfp run create -e EXPERIMENT -f PACKAGE key=value ...`); token from $KFP_TOKEN."""
    from customcrafter.orchestration.kfp_client import submit_run
    from customcrafter.orchestration.local_run import pipeline_arguments

    run_id = submit_run(host, package, arguments=pipeline_arguments(param), experiment=experiment,
                        run_name=run_name, namespace=namespace, service_account=service_account)
    typer.echo(f"submitted run {run_id} to {host} (experiment {experiment})")


@pipeline_app.command("schedule")
def schedule_cmd(
    host: str = typer.Option(..., "--host", help="KFP API endpoint"),
    cron: str = typer.Option("0 3 * * *", "--cron", help="5-field cron (sent as KFP's 6 fields, seconds first: "
                                                          "'0 ' prefixed), KFP's 6 fields, or @daily / @every 6h"),
    experiment: str = typer.Option(DEFAULT_EXPERIMENT, "--experiment", "-e"),
    job_name: str = typer.Option("retrain-new-subjects", "--job-name"),
    param: list[str] = typer.Option([], "--param", "-p", help=_PARAM_HELP),
    package: Path = typer.Option(COMPILED_DIR / "retrain_new_subjects.yaml", "--package", "-f"),
    namespace: str = typer.Option(None, "--namespace"),
    service_account: str = typer.Option(PIPELINE_SERVICE_ACCOUNT, "--service-account", help=_SA_HELP),
) -> None:
    """Schedule retraining of new/changed subjects (same as `kfp recurring-run create`); prints the cron sent."""
    from customcrafter.orchestration.kfp_client import CronError, schedule_retraining, to_kfp_cron
    from customcrafter.orchestration.local_run import pipeline_arguments

    try:
        kfp_cron = to_kfp_cron(cron)  # what KFP gets (schedule_retraining sends a KFP form as it is)
    except CronError as exc:
        raise UserError(f"--cron: {exc}") from None
    job_id = schedule_retraining(host, package, kfp_cron, experiment=experiment, job_name=job_name,
                                 arguments=pipeline_arguments(param), namespace=namespace,
                                 service_account=service_account)
    typer.echo(f"scheduled {job_name} ({job_id}) on {host} with cron {kfp_cron!r}{_cron_note(cron, kfp_cron)}")


def _cron_note(typed: str, sent: str) -> str:
    """How the cron sent differs from the one typed ('' when it does not)."""
    if sent == typed:
        return ""
    if len(sent.split()) == len(typed.split()) + 1:
        return f" (typed {typed!r}: KFP's cron has a seconds field first, so '0 ' was prefixed)"
    return f" (typed {typed!r})"


def _csv(value: str | None, option: str) -> list[str] | None:
    """A comma-separated option's names; None when the option was not given. Given but naming nothing (``""``,
    ``","``) is a usage error, not the default."""
    if value is None:
        return None
    if names := [v.strip() for v in value.split(",") if v.strip()]:
        return names
    raise UserError(f"{option}: {value!r} names nothing (leave the option out for the default)")


@pipeline_app.command("run-local")
def run_local_cmd(
    subjects: str = typer.Option(None, "--subjects", help="comma-separated (default: dog; with --retrain: "
                                                         "all subjects)"),
    methods: str = typer.Option(None, "--methods", help=f"comma-separated, each once, of {', '.join(METHODS)} "
                                                        f"(default: {','.join(DEFAULT_METHODS)})"),
    base_model: str = typer.Option("tiny", "--base-model", help="'tiny', a hub id, a checkpoint or a folder"),
    out: Path = typer.Option(Path("outputs/local"), "--out", help="pipeline root, MLflow store, links"),
    preset: str = typer.Option("tiny", "--preset", help="tiny/ci (CPU minutes) or full (paper settings)"),
    override: list[str] = typer.Option([], "--override", "--set", help="SECTION.KEY=VALUE on top of the preset "
                                                              "(sections: train, sample, augment, evaluate, run)"),
    data_source: Path = typer.Option(Path("."), "--data", "--data-root", help="repository or data root with subjects/"),
    experiment: str = typer.Option(DEFAULT_EXPERIMENT, "--experiment"),
    retrain: bool = typer.Option(False, "--retrain", help="run retrain_new_subjects (only new/changed "
                                                          "subjects) instead"),
) -> None:
    """Run the whole pipeline on this machine (KFP SubprocessRunner, local MLflow, DVC workspace data)."""
    from customcrafter.orchestration.local_run import run_local

    run_local(subjects=_csv(subjects, "--subjects"), methods=_csv(methods, "--methods"), base_model=base_model,
              out=out, preset=preset, overrides=override, data_source=data_source, experiment=experiment,
              retrain=retrain, echo=typer.echo)


@pipeline_app.command("prune-checkpoints")
def prune_checkpoints_cmd(
    older_than: str = typer.Option(..., "--older-than", help="remove job folders with nothing written for this long: "
                                                            "a number and s, m, h, d or w (e.g. 7d)"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="the model cache (default $CUSTOMCRAFTER_CACHE, else "
                                                            "~/.cache/customcrafter)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be removed, remove nothing"),
) -> None:
    """Remove the checkpoint folders that failed pipeline runs leave under <cache>/checkpoints/<job id>."""
    from customcrafter.loading import default_cache_dir
    from customcrafter.orchestration.checkpoints import parse_duration, prune_checkpoints

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise UserError(f"--older-than: {exc}") from None
    cache = Path(cache_dir or default_cache_dir())
    if not cache.is_dir():  # a mistyped path or an unmounted volume: "0 freed" would hide it
        raise UserError(f"{'--cache-dir' if cache_dir else 'the model cache ($CUSTOMCRAFTER_CACHE)'}: {cache} is not "
                        "a folder")
    jobs = prune_checkpoints(cache, age, dry_run=dry_run)
    pruned, failed = [job for job in jobs if job.error is None], [job for job in jobs if job.error is not None]
    for job in pruned:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {job.path} ({job.size / 2**20:.1f} MiB, "
                   f"nothing written for {job.age})")
    for job in failed:
        typer.echo(f"could not remove {job.path}: {job.error}", err=True)
    total = sum(job.size for job in pruned) / 2**30
    typer.echo(f"{len(pruned)} job folder(s), {total:.2f} GiB {'would be ' if dry_run else ''}freed")
    if failed:
        raise typer.Exit(1)

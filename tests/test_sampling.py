"""Sampling with DWVSS on the tiny model, the evaluation set, and the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli

from customcrafter.dwvss import DWVSSConfig, dwvss_plan
from customcrafter.sampling import SampleConfig

SMALL = dict(num_inference_steps=6, num_frames=2, height=64, width=96)


@pytest.fixture(scope="module")
def lora_pipe_factory(tmp_path_factory):
    """Loads the tiny base with a LoRA module whose up-projections are random (so the adapter matters)."""
    from customcrafter.loading import load_base_pipeline
    from customcrafter.training.config import TrainConfig
    from customcrafter.training.methods import CustomCrafterMethod

    def make():
        pipe = load_base_pipeline("tiny")
        method = CustomCrafterMethod(TrainConfig(subject_dir="x", base_model="tiny"))
        torch.manual_seed(1)
        pipe.unet.add_adapter(method.lora_config(), adapter_name="subject")
        with torch.no_grad():
            for name, param in pipe.unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        return pipe

    return make


def _video(pipe, scales_hook, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a dog", generator=generator, output_type="pt", fps=16, on_step_begin=scales_hook, **SMALL).frames


def test_dwvss_scales_follow_the_schedule_and_weights_are_restored(lora_pipe_factory):
    from customcrafter.dwvss import dwvss_sampling

    pipe = lora_pipe_factory()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = DWVSSConfig(lambda_s=0.3, lambda_l=0.9, k=2)
    with dwvss_sampling(pipe.unet, config, SMALL["num_inference_steps"]) as callback:
        _video(pipe, callback)
    assert callback.recorded == list(dwvss_plan(config, 6).scales) == [0.3, 0.3, 0.9, 0.9, 0.9, 0.9]
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_lambda_zero_is_the_base_model_bit_for_bit(lora_pipe_factory):
    from customcrafter.dwvss import dwvss_sampling
    from customcrafter.loading import load_base_pipeline

    base = _video(load_base_pipeline("tiny"), None)
    pipe = lora_pipe_factory()
    with dwvss_sampling(pipe.unet, DWVSSConfig(lambda_s=0.0, lambda_l=0.0), 6) as callback:
        zero = _video(pipe, callback)
    assert torch.equal(zero, base)
    assert not torch.equal(_video(pipe, None), base)  # the adapter does change the model


def test_fused_phases_match_the_unfused_lora_computation(lora_pipe_factory):
    from customcrafter.dwvss import dwvss_sampling

    pipe = lora_pipe_factory()
    config = DWVSSConfig(lambda_s=0.4, lambda_l=0.8, k=3)
    with dwvss_sampling(pipe.unet, config, 6) as callback:
        fused = _video(pipe, callback)

    def set_adapter_scale(pipe_, step_index, timestep):  # the slow way: peft's per-layer scale every step
        pipe_.unet.set_adapters(["subject"], weights=[dwvss_plan(config, 6).scales[step_index]])

    unfused = _video(pipe, set_adapter_scale)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)


def test_prompt_without_the_token_warns(lora_pipe_factory, tmp_path, dreambooth_dir, caplog):
    from customcrafter.sampling import sample_video
    from customcrafter.subject_module import LoadedModule, loaded_modules

    pipe = lora_pipe_factory()
    loaded_modules(pipe).append(LoadedModule(module_dir=tmp_path, method="customcrafter", adapter_name="subject",
                                             token="<new1>", class_word="dog", fps=16, uses_lora=True, meta={}))
    with caplog.at_level(logging.WARNING):
        sample_video(pipe, "a dog on a beach", seed=0, config=SampleConfig(**SMALL))
    assert any("no loaded subject token" in r.message for r in caplog.records)


def test_evaluation_set_writes_manifest_and_resumes(tmp_path, dreambooth_dir):
    from customcrafter.loading import load_base_pipeline
    from customcrafter.sampling import sample_evaluation_set

    pipe = load_base_pipeline("tiny")
    config = SampleConfig(**{**SMALL, "num_inference_steps": 2})
    manifest = sample_evaluation_set(pipe, method="base", subject="dog", subject_dir=dreambooth_dir / "dog",
                                     out_dir=tmp_path, seeds=[0, 1], prompt_limit=2, config=config,
                                     class_word="dog", kind="live")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 4
    row = rows[0]
    assert {"method", "subject", "subject_dir", "class_word", "token", "kind", "prompt", "prompt_template",
            "prompt_type", "prompt_index", "seed", "video", "sampling"} <= set(row)
    assert row["video"] == "dog/p00_s0.mp4" and (tmp_path / row["video"]).stat().st_size > 0
    # the base model is the motion reference: conditioned at the modules' fps (16), not its own default 28; plain DDIM
    assert row["sampling"]["fps"] == 16 and row["sampling"]["dwvss"] is None
    stamp = (tmp_path / row["video"]).stat().st_mtime_ns
    sample_evaluation_set(pipe, method="base", subject="dog", subject_dir=dreambooth_dir / "dog", out_dir=tmp_path,
                          seeds=[0, 1], prompt_limit=2, config=config, class_word="dog", kind="live")
    assert (tmp_path / row["video"]).stat().st_mtime_ns == stamp  # not sampled again


def test_evaluation_set_writes_each_video_while_the_next_samples_and_surfaces_write_errors(tmp_path, dreambooth_dir,
                                                                                          monkeypatch):
    """The export of video k runs while video k+1 samples (the GPU does not wait for the H.264 encoder); every
    export has finished when the call returns; an export that fails fails the call, with no manifest."""
    import threading

    import customcrafter.sampling as sampling
    import customcrafter.video_io as video_io
    from customcrafter.loading import load_base_pipeline

    sampled, overlapped, written = [], [], []
    next_started = threading.Event()

    def fake_sample(pipe, text, seed, config):
        sampled.append(seed)
        if len(sampled) > 1:
            next_started.set()
        return np.zeros((2, 8, 8, 3), np.uint8)

    def fake_export(frames, target, fps):
        if not written:  # the first video's export: does the second video start sampling meanwhile?
            overlapped.append(next_started.wait(timeout=20))
        if fail and len(written) == 1:
            raise OSError("disk full")
        Path(target).write_bytes(b"mp4")
        written.append(Path(target).name)

    monkeypatch.setattr(sampling, "sample_video", fake_sample)
    monkeypatch.setattr(video_io, "export_mp4", fake_export)
    pipe = load_base_pipeline("tiny")
    kwargs = dict(method="base", subject="dog", subject_dir=dreambooth_dir / "dog", seeds=[0, 1, 2], prompt_limit=1,
                  config=SampleConfig(**SMALL), class_word="dog", kind="live")
    fail = False
    manifest = sampling.sample_evaluation_set(pipe, out_dir=tmp_path / "ok", **kwargs)
    assert overlapped == [True] and written == ["p00_s0.mp4", "p00_s1.mp4", "p00_s2.mp4"]
    assert [json.loads(line)["video"] for line in manifest.read_text().splitlines()] == [
        "dog/p00_s0.mp4", "dog/p00_s1.mp4", "dog/p00_s2.mp4"]

    sampled.clear(), overlapped.clear(), written.clear(), next_started.clear()
    fail = True
    with pytest.raises(OSError, match="disk full"):
        sampling.sample_evaluation_set(pipe, out_dir=tmp_path / "failed", **kwargs)
    assert not (tmp_path / "failed" / "manifest.jsonl").exists() and written == ["p00_s0.mp4"]


def test_evaluation_set_rerun_with_other_settings_is_refused(tmp_path, dreambooth_dir):
    """The videos on disk are kept: a rerun with other settings would label them with settings they lack."""
    from customcrafter.loading import load_base_pipeline
    from customcrafter.sampling import sample_evaluation_set

    pipe = load_base_pipeline("tiny")
    kwargs = dict(method="base", subject="dog", subject_dir=dreambooth_dir / "dog", out_dir=tmp_path, seeds=[0],
                  prompt_limit=1, class_word="dog", kind="live")
    manifest = sample_evaluation_set(pipe, config=SampleConfig(**{**SMALL, "num_inference_steps": 2}), **kwargs)
    before = manifest.read_text()
    with pytest.raises(ValueError, match=r"sampled with other settings \(num_inference_steps 2 -> 3\).*delete the"):
        sample_evaluation_set(pipe, config=SampleConfig(**{**SMALL, "num_inference_steps": 3}), **kwargs)
    assert manifest.read_text() == before


def test_evaluation_set_records_the_dtype_and_refuses_a_rerun_in_another(tmp_path, dreambooth_dir):
    """bf16 and fp32 videos are not like for like: the manifest records the precision the UNet ran at, and a rerun
    at another one is refused like any other setting; a manifest from before dtype was recorded still resumes."""
    from customcrafter.loading import load_base_pipeline
    from customcrafter.sampling import sample_evaluation_set

    pipe = load_base_pipeline("tiny")
    kwargs = dict(method="base", subject="dog", subject_dir=dreambooth_dir / "dog", out_dir=tmp_path, seeds=[0],
                  prompt_limit=1, class_word="dog", kind="live",
                  config=SampleConfig(**{**SMALL, "num_inference_steps": 2}))
    manifest = sample_evaluation_set(pipe, **kwargs)
    row = json.loads(manifest.read_text())
    assert row["sampling"]["dtype"] == "fp32"
    before = manifest.read_text()
    with pytest.raises(ValueError, match=r"sampled with other settings \(dtype 'fp32' -> 'bf16'\)"):
        sample_evaluation_set(pipe.to(dtype=torch.bfloat16), **kwargs)
    assert manifest.read_text() == before
    pipe.to(dtype=torch.float32)
    # an older manifest, without dtype: read, resumed (nothing sampled again), and the kept videos' dtype stays unknown
    del row["sampling"]["dtype"]
    manifest.write_text(json.dumps(row) + "\n")
    stamp = (tmp_path / row["video"]).stat().st_mtime_ns
    rerun = json.loads(sample_evaluation_set(pipe, **kwargs).read_text())
    assert rerun["sampling"] == row["sampling"] and (tmp_path / row["video"]).stat().st_mtime_ns == stamp


def test_cli_samples_the_base_model_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "base.mp4"
    code = run_cli(["sample", "--base-model", "tiny", "--prompt", "a dog", "--steps", "2", "--set", "num_frames=2",
                 "--set", "height=64", "--set", "width=96", "--out", str(out)])
    assert code == 0 and out.stat().st_size > 0
    from customcrafter.video_io import read_video

    assert np.asarray(read_video(out)).shape[1:3] == (64, 96)
    stamp = out.stat().st_mtime_ns
    assert run_cli(["sample", "--base-model", "tiny", "--prompt", "x", "--out", str(out)]) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err and out.stat().st_mtime_ns == stamp
    assert run_cli(["sample", "--base-model", "tiny", "--prompt", "x", "--out", str(tmp_path / "v.avi")]) == 2
    capsys.readouterr()
    # usage errors (typer raises its vendored click's exceptions): click's message naming the option, exit 2
    assert run_cli(["sample", "--prompt", "x"]) == 2 and "Missing option '--out'" in capsys.readouterr().err
    assert run_cli(["sample", "--prompt", "x", "--out", str(out), "--seed", "abc"]) == 2
    assert "Invalid value for '--seed'" in capsys.readouterr().err
    assert run_cli(["train", "--subject", str(tmp_path), "--class-word", "dog", "--set", "learning_rate=1"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in Path(tmp_path).iterdir())  # no temporary left behind


def test_cli_train_keeps_a_finished_module_unless_forced(tmp_path, capsys, dreambooth_dir):
    small = ["--base-model", "tiny", "--subject", str(dreambooth_dir / "dog"), "--class-word", "dog",
             "--method", "dreamvideo", "--output", str(tmp_path / "run"), "--set", "steps=1",
             "--set", "dreamvideo.inversion_steps=1", "--set", "resolution=[64, 96]", "--set", "num_frames=2"]
    assert run_cli(["train", *small]) == 0
    module = tmp_path / "run" / "subject_module" / "module.json"
    stamp = module.stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli(["train", *small]) == 2  # refused before loading anything
    assert "--force" in capsys.readouterr().err and module.stat().st_mtime_ns == stamp
    # --out is the same option as --output (the name sample, evaluate and data use)
    forced = [*small[:small.index("--output")], "--out", *small[small.index("--output") + 1:], "--force"]
    assert run_cli(["train", *forced]) == 0 and module.stat().st_mtime_ns != stamp


def test_cli_train_refuses_an_output_under_a_file_before_loading(tmp_path, capsys, monkeypatch, dreambooth_dir):
    import customcrafter.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("loaded the base model for an output folder that cannot be written")

    monkeypatch.setattr(loading, "load_base_pipeline", refuse)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for output in (a_file, a_file / "run"):
        assert run_cli(["train", "--base-model", "tiny", "--subject", str(dreambooth_dir / "dog"), "--class-word",
                        "dog", "--output", str(output)]) == 2, output
        assert f"error: output_dir {output}: {a_file} is a file, not a folder" in capsys.readouterr().err


def test_cli_sample_checks_flags_before_loading_and_uses_the_gpu_by_default(tmp_path, capsys, monkeypatch):
    import torch

    import customcrafter.loading as loading

    out = str(tmp_path / "v.mp4")
    for flags, named in ((["--dwvss", "0.1,0.2,1"], "--dwvss"), (["--compile", "turbo"], "--compile"),
                         (["--device", "gpu0"], "--device")):
        assert run_cli(["sample", "--base-model", "tiny", "--prompt", "x", "--out", out, *flags]) == 2
        assert f"error: {named}" in capsys.readouterr().err  # one line naming the flag, before any loading

    asked = []

    def stop(model, device=None, **kwargs):
        asked.append(device)
        raise KeyboardInterrupt  # stands in for the minutes of loading a real model

    monkeypatch.setattr(loading, "load_base_pipeline", stop)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_cli(["sample", "--base-model", "tiny", "--prompt", "x", "--out", out]) == 130
    assert asked == [torch.device("cuda")]  # no --device: the GPU when there is one, not the CPU
    # an --out under a file is refused before loading, not after minutes of sampling
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert run_cli(["sample", "--base-model", "tiny", "--prompt", "x", "--out", str(a_file / "v.mp4")]) == 2
    assert f"error: --out {a_file / 'v.mp4'}: {a_file} is a file, not a folder" in capsys.readouterr().err
    assert asked == [torch.device("cuda")]


def test_cli_sample_refuses_a_reference_schedule_that_would_skip_the_last_step(tmp_path, capsys, monkeypatch):
    """--dwvss ...,reference with K >= steps: exit 2 naming the option and both numbers, before loading."""
    import customcrafter.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("loaded the base model for a schedule that cannot run")

    monkeypatch.setattr(loading, "load_base_pipeline", refuse)
    module = tmp_path / "module"
    module.mkdir()
    (module / "module.json").write_text(json.dumps({"method": "customcrafter", "base_model_signature": "tiny",
                                                    "token": "<new1>", "class_word": "dog", "fps": 16,
                                                    "uses_lora": True}))
    argv = ["sample", "--base-model", "tiny", "--prompt", "<new1> dog", "--out", str(tmp_path / "v.mp4"),
            "--subject-module", str(module), "--dwvss", "0.4,0.8,5,reference"]
    assert run_cli([*argv, "--steps", "5"]) == 2
    assert ("error: --dwvss 0.4,0.8,5,reference: dwvss.k (5) must be below num_inference_steps (5) in reference "
            "mode") in capsys.readouterr().err
    assert run_cli([*argv, "--set", "num_inference_steps=4"]) == 2  # steps from --set: the same check
    assert "dwvss.k (5) must be below num_inference_steps (4)" in capsys.readouterr().err
    assert run_cli([*argv[:-2], "--set", "dwvss.mode=reference", "--steps", "5"]) == 2  # the schedule from --set
    assert "dwvss.k (5) must be below num_inference_steps (5) in reference mode" in capsys.readouterr().err


def test_cli_sample_eval_set_checks_flags_before_loading(tmp_path, capsys, monkeypatch, dreambooth_dir):
    import customcrafter.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("loaded the base model despite a bad flag")

    monkeypatch.setattr(loading, "load_base_pipeline", refuse)
    out = tmp_path / "set"
    module = tmp_path / "no_module"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    dog = ["--subject", str(dreambooth_dir / "dog"), "--class-word", "dog"]
    for flags, named in (([], "--subject-module DIR or --base"),
                         (["--base", "--subject-module", str(module)], "--subject-module DIR or --base"),
                         (["--subject-module", str(module)], f"--subject-module {module}"),
                         (["--base", "--kind", "alive"], "--kind"),
                         (["--base", "--seed", "1", "--seed", "1"], "--seed 1 1"),
                         (["--base", "--compile", "turbo"], "--compile"),
                         (["--base", "--device", "gpu0"], "--device"),
                         (["--base", "--out", str(a_file)], f"--out {a_file}: not a folder"),
                         (["--base", "--out", str(a_file / "set")], f"--out {a_file / 'set'}: {a_file} is a file")):
        assert run_cli(["sample-eval-set", "--base-model", "tiny", *dog, "--out", str(out), *flags]) == 2, flags
        assert f"error: {named}" in capsys.readouterr().err, flags
    # a bare image folder needs its class word (subject.yaml has it)
    assert run_cli(["sample-eval-set", "--base", "--subject", str(dreambooth_dir / "dog"), "--out", str(out)]) == 2
    assert "error: --subject " in (err := capsys.readouterr().err) and "--class-word" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.jsonl").write_text('{"method": "base"\n')
    assert run_cli(["sample-eval-set", "--base", *dog, "--out", str(broken)]) == 2
    assert f"error: --out {broken}: its manifest.jsonl is not one JSON object per line" in capsys.readouterr().err
    # --subject is a folder or a name under --data-root, as in train and data validate
    assert run_cli(["sample-eval-set", "--base", "--subject", "ghost", "--data-root", str(tmp_path), "--out",
                 str(out)]) == 2
    assert "error: --subject 'ghost': neither a folder nor a subject" in capsys.readouterr().err
    # usage errors: click's message naming the option, exit 2
    assert run_cli(["sample-eval-set", "--base", *dog, "--out", str(out), "--prompt-limit", "0"]) == 2
    assert "Invalid value for '--prompt-limit'" in capsys.readouterr().err
    assert run_cli(["sample-eval-set", "--base", *dog]) == 2 and "Missing option '--out'" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_cli_sample_eval_set_interrupted_writes_no_manifest_and_resumes(tmp_path, capsys, monkeypatch,
                                                                         dreambooth_dir):
    import customcrafter.sampling as sampling

    out = tmp_path / "base"
    argv = ["sample-eval-set", "--base", "--base-model", "tiny", "--subject", str(dreambooth_dir / "dog"),
            "--class-word", "dog", "--kind", "live", "--out", str(out), "--prompt-limit", "1", "--seed", "0",
            "--seed", "1", "--steps", "2", "--set", "num_frames=2", "--set", "height=64", "--set", "width=96",
            "--device", "cpu"]
    real, calls = sampling.sample_video, []

    def interrupted(*args, **kwargs):  # Ctrl-C while sampling the second video
        calls.append(kwargs["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_video", interrupted)
    assert run_cli(argv) == 130
    first = out / "dog" / "p00_s0.mp4"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [  # no manifest; the run's mark
        ".sampling_run.json", "dog", "dog/p00_s0.mp4"]                          # (settings, origin) is there
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    # the kept video is listed by no manifest, but the mark holds its settings: a rerun at other settings (which
    # would label it with them) is refused, before any sampling
    assert run_cli([*argv[:argv.index("--steps")], "--steps", "3", *argv[argv.index("--steps") + 2:]]) == 2
    assert "were sampled with other settings (num_inference_steps 2 -> 3)" in capsys.readouterr().err
    assert calls == [0, 1]
    assert run_cli(argv) == 0 and calls == [0, 1, 1]  # resumed: only the missing video sampled
    assert first.stat().st_mtime_ns == stamp
    assert f"wrote 2 videos of dog (base) to {out}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"], r["video"]) for r in rows] == [("base", 0, "dog/p00_s0.mp4"),
                                                                    ("base", 1, "dog/p00_s1.mp4")]
    assert rows[0]["sampling"]["fps"] == 16 and rows[0]["prompt"] == "dog is walking in the street."
    # another method's set would replace this manifest: refused, the folder untouched
    manifest = (out / "manifest.jsonl").read_bytes()
    assert run_cli([*argv, "--method", "base_fps28"]) == 2
    assert f"error: --out {out}: holds the evaluation set of base/dog" in capsys.readouterr().err
    assert (out / "manifest.jsonl").read_bytes() == manifest

"""Subject modules: stock-peft readable, reload in a fresh process, several at once, wrong base = error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from customcrafter.sampling import SampleConfig

SMALL = SampleConfig(num_inference_steps=3, num_frames=2, height=64, width=96)


@pytest.fixture(scope="module")
def trained_module(tmp_path_factory, request) -> Path:
    from conftest import require_shared

    from customcrafter.training.config import TrainConfig
    from customcrafter.training.trainer import train

    dreambooth = require_shared("datasets", "dreambooth")
    tmp = tmp_path_factory.mktemp("module")
    config = TrainConfig(base_model="tiny", subject_dir=str(dreambooth / "cat"), class_word="cat",
                         output_dir=str(tmp / "run"), resolution=(64, 96), num_frames=2, steps=3,
                         prior_preservation=False, checkpoint_every=None, lr=1e-2)
    return train(config).module_dir


def test_module_layout_is_stock_peft(trained_module):
    from peft import LoraConfig
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(trained_module))
    assert (config.r, config.lora_alpha) == (4, 4)
    keys = load_file(str(trained_module / "adapter_model.safetensors")).keys()
    assert keys and all(k.startswith("base_model.model.") and (".lora_A.weight" in k or ".lora_B.weight" in k)
                        for k in keys)
    meta = json.loads((trained_module / "module.json").read_text())
    assert (meta["method"], meta["token"], meta["class_word"], meta["fps"]) == ("customcrafter", "<new1>", "cat", 16)
    assert meta["base_model_id"] == "tiny" and meta["dwvss"]["lambda_s"] == 0.4
    assert json.loads((trained_module / "tokenizer_added.json").read_text())["tokens"] == ["<new1>"]


def test_module_reproduces_the_same_video_in_a_fresh_process(trained_module, tmp_path):
    from customcrafter.loading import load_base_pipeline
    from customcrafter.sampling import sample_video
    from customcrafter.subject_module import load_subject_module

    pipe = load_base_pipeline("tiny")
    load_subject_module(pipe, trained_module)
    here = sample_video(pipe, "<new1> cat on a sofa", seed=7, config=SMALL)
    script = (
        "import sys, numpy as np\n"
        "from customcrafter.loading import load_base_pipeline\n"
        "from customcrafter.sampling import SampleConfig, sample_video\n"
        "from customcrafter.subject_module import load_subject_module\n"
        "pipe = load_base_pipeline('tiny'); load_subject_module(pipe, sys.argv[1])\n"
        "config = SampleConfig(num_inference_steps=3, num_frames=2, height=64, width=96)\n"
        "np.save(sys.argv[2], sample_video(pipe, '<new1> cat on a sofa', seed=7, config=config))\n"
    )
    out = tmp_path / "video.npy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script, str(trained_module), str(out)], check=True, env=env, timeout=300)
    assert np.array_equal(np.load(out), here)


def test_module_from_another_base_is_an_error_naming_both(trained_module, tmp_path):
    import shutil

    from customcrafter.loading import load_base_pipeline
    from customcrafter.subject_module import load_subject_module

    other = tmp_path / "other"
    shutil.copytree(trained_module, other)
    meta = json.loads((other / "module.json").read_text())
    meta.update(base_model_id="VideoCrafter/VideoCrafter2", base_model_signature="0123456789abcdef" * 4)
    (other / "module.json").write_text(json.dumps(meta))
    pipe = load_base_pipeline("tiny")
    with pytest.raises(ValueError, match=r"VideoCrafter/VideoCrafter2.*'tiny'"):
        load_subject_module(pipe, other)
    assert "<new1>" not in pipe.tokenizer.get_vocab()  # nothing half-loaded


def test_two_modules_with_the_same_token_load_together(trained_module):
    from customcrafter.loading import load_base_pipeline
    from customcrafter.sampling import last_sampling_record, sample_video
    from customcrafter.subject_module import load_subject_module

    pipe = load_base_pipeline("tiny")
    first = load_subject_module(pipe, trained_module)
    second = load_subject_module(pipe, trained_module)
    assert first.token == "<new1>" and second.token_mapping == {"<new1>": "<new2>"}
    assert first.adapter_name != second.adapter_name
    assert set(pipe.unet.peft_config) == {first.adapter_name, second.adapter_name}
    video = sample_video(pipe, "<new1> cat and <new2> cat", seed=0, config=SMALL)
    assert video.shape == (2, 64, 96, 3)
    assert last_sampling_record(pipe)["scales"] == [0.4, 0.4, 0.4]  # 3 steps < K = 5


def _train_dog_module(tmp_path_factory, method: str, **fields) -> Path:
    """A 2-step module of ``method`` for the DreamBooth dog on the tiny model."""
    from conftest import require_shared

    from customcrafter.training.config import TrainConfig
    from customcrafter.training.trainer import train

    dreambooth = require_shared("datasets", "dreambooth")
    tmp = tmp_path_factory.mktemp(f"{method}_module")
    config = TrainConfig(method=method, base_model="tiny", subject_dir=str(dreambooth / "dog"), class_word="dog",
                         output_dir=str(tmp / "run"), resolution=(64, 96), num_frames=2, steps=2,
                         prior_preservation=False, checkpoint_every=None, lr=1e-2, **fields)
    return train(config).module_dir


@pytest.fixture(scope="module")
def custom_diffusion_module(tmp_path_factory) -> Path:
    return _train_dog_module(tmp_path_factory, "custom_diffusion")


def test_custom_diffusion_loads_after_a_lora_module(trained_module, custom_diffusion_module):
    """peft renames the layers a LoRA wraps (``to_k.base_layer.weight``): the Custom Diffusion deltas still go to
    their base weights."""
    import torch
    from safetensors.torch import load_file

    from customcrafter.loading import load_base_pipeline
    from customcrafter.sampling import sample_video
    from customcrafter.subject_module import load_subject_module

    pipe = load_base_pipeline("tiny")
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    lora = load_subject_module(pipe, trained_module)
    deltas = load_file(str(custom_diffusion_module / "deltas.safetensors"))
    cd = load_subject_module(pipe, custom_diffusion_module)
    assert (lora.token, cd.token) == ("<new1>", "<new2>") and cd.method == "custom_diffusion"
    state = pipe.unet.state_dict()
    for name, delta in deltas.items():
        wrapped = name.replace(".weight", ".base_layer.weight")
        assert wrapped in state, wrapped
        torch.testing.assert_close(state[wrapped], base[name] + delta)
    video = sample_video(pipe, "<new1> cat and <new2> dog", seed=0, config=SMALL)
    assert video.shape == (2, 64, 96, 3)


def test_a_module_whose_weights_do_not_fit_adds_no_token(custom_diffusion_module, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from customcrafter.loading import load_base_pipeline
    from customcrafter.subject_module import load_subject_module

    broken = tmp_path / "broken"
    shutil.copytree(custom_diffusion_module, broken)
    deltas = load_file(str(broken / "deltas.safetensors"))
    last = sorted(deltas)[-1]
    deltas[last] = deltas[last][:, :-1].contiguous()
    save_file(deltas, str(broken / "deltas.safetensors"))
    pipe = load_base_pipeline("tiny")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match=rf"deltas\.safetensors: '{last}'"):
        load_subject_module(pipe, broken)
    assert "<new1>" not in pipe.tokenizer.get_vocab()  # nothing half-loaded
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


@pytest.fixture(scope="module")
def dreamvideo_module(tmp_path_factory) -> Path:
    return _train_dog_module(tmp_path_factory, "dreamvideo", dreamvideo={"inversion_steps": 2})


@pytest.mark.parametrize("method", ["customcrafter", "dreamvideo"])
def test_a_module_that_fails_to_load_leaves_the_pipeline_as_it_was(method, trained_module, dreamvideo_module,
                                                                   tmp_path):
    """A weight file that does not fit: an error naming it, and no adapter, token or hook left behind (the next
    video is the base model's)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from customcrafter.loading import load_base_pipeline
    from customcrafter.sampling import sample_video
    from customcrafter.subject_module import load_subject_module

    source, weights = {"customcrafter": (trained_module, "adapter_model.safetensors"),
                       "dreamvideo": (dreamvideo_module, "identity_adapter.safetensors")}[method]
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    tensors = load_file(str(broken / weights))
    if method == "dreamvideo":  # one block's adapter weight missing
        tensors.pop(sorted(tensors)[-1])
    else:  # a LoRA weight for a layer this UNet does not have
        name = sorted(tensors)[0]
        tensors[name.replace("down_blocks", "no_such_blocks")] = tensors.pop(name)
    save_file(tensors, str(broken / weights))

    pipe = load_base_pipeline("tiny")
    base_video = sample_video(pipe, "a dog", seed=0, config=SMALL)
    with pytest.raises(ValueError, match=weights.replace(".", r"\.")):
        load_subject_module(pipe, broken)
    assert "<new1>" not in pipe.tokenizer.get_vocab()
    assert not getattr(pipe.unet, "peft_config", {})
    assert not any(len(getattr(m, "identity_adapters", ())) for m in pipe.unet.modules())
    np.testing.assert_array_equal(sample_video(pipe, "a dog", seed=0, config=SMALL), base_video)


def test_module_from_another_base_of_the_same_architecture_warns_naming_both(trained_module, tmp_path, caplog):
    """The signature covers the architecture only: a module trained on another checkpoint of the same shapes (a
    fine-tune) loads, with a warning naming both bases; the same base loads silently."""
    import logging
    import shutil

    from customcrafter.loading import load_base_pipeline
    from customcrafter.subject_module import load_subject_module

    other = tmp_path / "other"
    shutil.copytree(trained_module, other)
    meta = json.loads((other / "module.json").read_text())
    meta.update(base_model_id="/models/videocrafter2_finetune.ckpt")
    (other / "module.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="customcrafter.subject_module"):
        load_subject_module(load_base_pipeline("tiny"), trained_module)
        assert not caplog.records
        load_subject_module(load_base_pipeline("tiny"), other)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "'/models/videocrafter2_finetune.ckpt', loaded onto 'tiny'" in caplog.records[0].getMessage()


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "token_embeddings.safetensors"])
def test_a_damaged_weight_file_is_an_error_naming_it(damaged, trained_module, tmp_path):
    """An interrupted copy or download of a module: safetensors' own error ('incomplete metadata, file not fully
    covered') names no file. The error names it, and nothing is loaded."""
    import shutil

    from customcrafter.loading import load_base_pipeline
    from customcrafter.subject_module import load_subject_module

    broken = tmp_path / "broken"
    shutil.copytree(trained_module, broken)
    data = (broken / damaged).read_bytes()
    (broken / damaged).write_bytes(data[: len(data) - 64])
    pipe = load_base_pipeline("tiny")
    with pytest.raises(ValueError, match=rf"{re.escape(str(broken / damaged))}: not a readable safetensors file"):
        load_subject_module(pipe, broken)
    assert "<new1>" not in pipe.tokenizer.get_vocab() and not getattr(pipe.unet, "peft_config", {})


def test_a_module_of_a_newer_format_is_refused_naming_the_versions(tmp_path):
    from customcrafter.subject_module import FORMAT_VERSION, read_module_meta

    meta = {"format_version": FORMAT_VERSION + 1, "method": "customcrafter", "base_model_signature": "0" * 16,
            "token": "<new1>", "class_word": "cat", "fps": 16}
    (tmp_path / "module.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"module\.json: format_version {FORMAT_VERSION + 1} is newer"):
        read_module_meta(tmp_path)
    meta["format_version"] = FORMAT_VERSION
    (tmp_path / "module.json").write_text(json.dumps(meta))
    assert read_module_meta(tmp_path)["token"] == "<new1>"

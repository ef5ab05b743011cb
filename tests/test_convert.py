"""Converter: the full-size key list maps exactly (meta tensors), and bad input fails cleanly through the CLI."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from customcrafter.cli import main
from customcrafter.convert import (
    COMPONENTS,
    build_empty_models,
    check_state_dict,
    convert_checkpoint,
    make_plans,
    read_configs,
)


def _vit_h_text_shapes(fixtures_dir) -> dict[str, tuple[int, ...]]:
    """The OpenCLIP ViT-H-14 text tower's keys: the tiny tower's names, 24 blocks, width 1024."""
    from safetensors import safe_open

    scale = {32: 1024, 96: 3072, 128: 4096}
    shapes = {}
    with safe_open(str(fixtures_dir / "tiny_openclip_text.safetensors"), "pt") as f:
        for key in f.keys():
            shape = tuple(scale.get(d, d) for d in f.get_slice(key).get_shape())
            if m := re.match(r"(.*resblocks\.)0\.(.*)", key):
                shapes.update({f"{m[1]}{i}.{m[2]}": shape for i in range(24)})
            elif ".resblocks." not in key:
                shapes[key] = shape
    return shapes


def test_full_size_checkpoint_maps_exactly_on_meta_tensors(fixtures_dir):
    listing = json.loads((fixtures_dir / "videocrafter2_checkpoint_keys.json").read_text())
    shapes = {k: tuple(v) for part in ("unet", "vae") for k, v in listing[part].items()}
    shapes.update(_vit_h_text_shapes(fixtures_dir))
    configs = read_configs()  # full-size defaults
    models = build_empty_models(configs, COMPONENTS)
    assert all(p.device.type == "meta" for m in models.values() for p in m.parameters())
    plans = make_plans(models, configs)
    check_state_dict(shapes, plans)  # every key present with its shape, nothing left over
    mapped = set().union(*(p.original_keys() for p in plans.values()))
    assert mapped == set(shapes)
    assert sum(p.numel() for p in models["unet"].parameters()) == listing["unet_num_params"]
    assert sum(p.numel() for p in models["vae"].parameters()) == listing["vae_num_params"]
    assert models["text_encoder"].config.num_hidden_layers == 23


@pytest.fixture
def tiny_ckpt(fixtures_dir):
    return load_file(str(fixtures_dir / "tiny_lvdm_checkpoint.safetensors"))


def _cli(*args) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code


def _convert_args(ckpt, out, fixtures_dir, components="unet,vae"):
    return ["convert", "--checkpoint", str(ckpt), "--config", str(fixtures_dir / "tiny_lvdm_config.yaml"),
            "--components", components, "--output", str(out)]


def test_cli_converts_legacy_pickle_like_safetensors(fixtures_dir, tiny_ckpt, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_ckpt, "global_step": 0}, ckpt)
    main(_convert_args(ckpt, tmp_path / "from_ckpt", fixtures_dir))
    reference = convert_checkpoint(fixtures_dir / "tiny_lvdm_checkpoint.safetensors", tmp_path / "from_st",
                                   config=fixtures_dir / "tiny_lvdm_config.yaml", components=["unet", "vae"])
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(tmp_path / "from_ckpt" / part)), load_file(str(reference / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    index = json.loads((tmp_path / "from_ckpt" / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["unet"][1] == "VideoCrafter2UNet"


@pytest.mark.parametrize("case", ["truncated", "wrong_format", "missing_key", "wrong_shape", "extra_key",
                                  "config_mismatch", "no_text_weights"])
def test_bad_input_is_one_line_error_and_nothing_written(case, fixtures_dir, tiny_ckpt, tmp_path, capsys):
    ckpt, args_components = tmp_path / "model.safetensors", "unet,vae"
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    expected = key
    if case == "truncated":
        data = (fixtures_dir / "tiny_lvdm_checkpoint.safetensors").read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
        expected = "not a readable safetensors file"
    elif case == "wrong_format":
        ckpt = tmp_path / "model.ckpt"
        ckpt.write_text("this is not a checkpoint")
        expected = "not a readable PyTorch checkpoint"
    else:
        sd = dict(tiny_ckpt)
        if case == "missing_key":
            del sd[key]
        elif case == "wrong_shape":
            sd[key] = torch.zeros(3, 3)
        elif case == "extra_key":
            key = "model.diffusion_model.input_blocks.1.1.surprise.weight"
            sd[key] = torch.zeros(1)
            expected = key
        elif case == "no_text_weights":
            args_components, expected = "unet,vae,text_encoder", "no text_encoder weights"
        save_file(sd, str(ckpt))
    out = tmp_path / "out"
    args = _convert_args(ckpt, out, fixtures_dir, args_components)
    if case == "config_mismatch":  # full-size defaults for tiny weights
        args = ["convert", "--checkpoint", str(fixtures_dir / "tiny_lvdm_checkpoint.safetensors"),
                "--components", "unet", "--output", str(out)]
        expected = "does not match the weights"
    assert _cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left either


def test_config_with_unsupported_structure_is_rejected(fixtures_dir, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text((fixtures_dir / "tiny_lvdm_config.yaml").read_text().replace("use_linear: true",
                                                                                    "use_linear: false"))
    code = _cli("convert", "--checkpoint", str(fixtures_dir / "tiny_lvdm_checkpoint.safetensors"), "--config",
                str(config), "--components", "unet", "--output", str(tmp_path / "out"))
    assert code == 2 and "unet_config.params.use_linear" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_conversion_racing_another_process_keeps_the_first_folder(tmp_path, monkeypatch):
    """Pods sharing the model-cache volume may convert the same checkpoint at once: the folder written first stays
    (a reader may already be loading it), the later copy is dropped, and both callers get the same folder."""
    import customcrafter.convert as convert
    from customcrafter.loading import converted_checkpoint_dir
    from customcrafter.utils import atomic_dir

    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"weights")

    def convert_while_another_pod_finishes(source, output, **kwargs):
        with atomic_dir(output) as tmp:
            (tmp / "model_index.json").write_text('{"writer": "this pod"}')
            output.mkdir(parents=True)  # the other pod's rename lands first
            (output / "model_index.json").write_text('{"writer": "other pod"}')

    monkeypatch.setattr(convert, "convert_checkpoint", convert_while_another_pod_finishes)
    target = converted_checkpoint_dir(checkpoint, cache_dir=tmp_path / "cache")
    assert json.loads((target / "model_index.json").read_text()) == {"writer": "other pod"}
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary folder left behind


def test_atomic_dir_without_overwrite_never_replaces_a_folder_that_appeared(tmp_path):
    from customcrafter.utils import atomic_dir

    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="written by another process meanwhile"):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("mine")
            target.mkdir()
    assert list(target.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(target, overwrite=True) as tmp:  # overwrite replaces, as before
        (tmp / "a.txt").write_text("mine")
    assert (target / "a.txt").read_text() == "mine"


#: a reader in its own process (no GIL shared with the writer): opens ``<target>/data`` as fast as it can until
#: ``<target>.stop`` appears; prints how often there was no such file, and any content that was not whole
_READER = """
import os, sys
target = sys.argv[1]
data, stop = os.path.join(target, "data"), target + ".stop"
missing, reads, torn = 0, 0, []
while not os.path.exists(stop):
    try:
        with open(data) as fh:
            text = fh.read()
    except FileNotFoundError:
        missing += 1
        continue
    reads += 1
    if len(set(text.split())) != 1 or len(text.split()) != 1000:
        torn.append(text[:40])
print(missing, reads, len(torn))
"""


def _overwrite_while_reading(tmp_path, overwrites: int) -> tuple[int, int, int]:
    import subprocess

    from customcrafter.utils import atomic_dir

    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "data").write_text("0 " * 1000)
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        for generation in range(1, overwrites + 1):
            with atomic_dir(target, overwrite=True) as tmp:
                (tmp / "data").write_text(f"{generation} " * 1000)
    finally:
        Path(f"{target}.stop").touch()
        missing, reads, torn = map(int, reader.communicate(timeout=60)[0].split())
    assert (target / "data").read_text() == f"{overwrites} " * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.stop"]  # no temporary or old folder left
    return missing, reads, torn


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_atomic_dir_overwrite_always_leaves_a_whole_folder_at_target(tmp_path):
    """Overwriting renamed the old folder aside and then the new one in: a reader between the two renames found no
    folder at all (a resuming run would start from scratch, a loader fail). On Linux the two are swapped in one
    step, so every read finds one generation's whole file."""
    missing, reads, torn = _overwrite_while_reading(tmp_path, 400)
    assert reads > 0 and (missing, torn) == (0, 0)


@pytest.mark.parametrize("unavailable", ["no renameat2", "filesystem refuses"])
def test_atomic_dir_overwrite_falls_back_to_renames_without_the_exchange(tmp_path, monkeypatch, unavailable):
    """Where there is no renameat2 (not Linux, an old libc) or the filesystem refuses the exchange (EINVAL), the
    old folder is renamed aside and the new one in, as before: the overwrite still happens and leaves nothing."""
    import ctypes
    import errno

    import customcrafter.utils as utils

    def refuses(*args):
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(utils, "_renameat2", lambda: None if unavailable == "no renameat2" else refuses)
    _overwrite_while_reading(tmp_path, 5)
    with utils.atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "data").write_text("last")
    assert (tmp_path / "out" / "data").read_text() == "last"


@pytest.mark.parametrize("model", ["/data/modles/videocrafter2", "./converted/vc2", "models/vc2/unet/"])
def test_a_mistyped_local_path_is_reported_as_not_found_not_sent_to_the_hub(model, tmp_path, monkeypatch):
    import customcrafter.loading as loading

    monkeypatch.setattr(loading, "_download", lambda m: pytest.fail(f"{m} sent to the hub"))
    with pytest.raises(FileNotFoundError, match=f"{re.escape(model)}: no such file or folder"):
        loading.resolve_base_model(model, cache_dir=tmp_path)


@pytest.mark.parametrize(("error", "status", "expected"), [
    ("RepositoryNotFoundError", 404, r"VideoCrafter/VideoCrafter2x: no such model repository on the hub"),
    ("GatedRepoError", 403, r"VideoCrafter/VideoCrafter2x: a gated model repository.*HF_TOKEN"),
    ("RemoteEntryNotFoundError", 404, r"VideoCrafter/VideoCrafter2x: the repository has no file 'model\.ckpt'"),
    ("HfHubHTTPError", 401, r"could not download model\.ckpt from the hub: set HF_TOKEN"),
])
def test_hub_errors_are_one_line_naming_the_repo_and_the_fix(error, status, expected, tmp_path, monkeypatch, capsys):
    """A typo in the repo id, a gated repo without a token, a missing file: the hub's multi-line HTTP messages
    become one line that names the repo id and what to do."""
    from types import SimpleNamespace

    import huggingface_hub
    import huggingface_hub.errors as hub_errors

    from customcrafter.loading import resolve_base_model

    def fail(repo_id, filename, **kwargs):
        response = SimpleNamespace(status_code=status, headers={}, request=None)
        raise getattr(hub_errors, error)(f"{status} Client Error.\n\nfor url: https://huggingface.co/{repo_id}",
                                         response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(OSError, match=expected) as exc:
        resolve_base_model("VideoCrafter/VideoCrafter2x", cache_dir=tmp_path)
    assert "\n" not in str(exc.value)


def test_a_folder_converted_by_an_older_converter_is_not_reused_from_the_cache(tmp_path, monkeypatch):
    """The cache key covers the converter: after a converter change (CONVERTER_VERSION bumped) the checkpoint is
    converted again instead of loading the folder the old mapping wrote."""
    import customcrafter.convert as convert
    from customcrafter.loading import converted_checkpoint_dir

    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"weights")
    written = []

    def fake_convert(source, output, **kwargs):
        written.append(output)
        output.mkdir(parents=True)
        (output / "model_index.json").write_text(json.dumps({"converter": convert.CONVERTER_VERSION}))

    monkeypatch.setattr(convert, "convert_checkpoint", fake_convert)
    first = converted_checkpoint_dir(checkpoint, cache_dir=tmp_path / "cache")
    assert converted_checkpoint_dir(checkpoint, cache_dir=tmp_path / "cache") == first and len(written) == 1
    monkeypatch.setattr(convert, "CONVERTER_VERSION", convert.CONVERTER_VERSION + 1)
    second = converted_checkpoint_dir(checkpoint, cache_dir=tmp_path / "cache")
    assert second != first and len(written) == 2
    assert json.loads((second / "model_index.json").read_text()) == {"converter": convert.CONVERTER_VERSION}


@pytest.mark.parametrize("how", ["cp -p", "rsync -t"])
def test_a_checkpoint_replaced_with_the_same_size_and_mtime_gets_a_new_cache_key(how, tmp_path):
    """``cp -p`` (written in place) and ``rsync -t`` (a copy renamed into place) keep size and modification time:
    the old key (path, size, mtime) reused the conversion of the file they replaced. The two files share their
    first and last chunks, as two checkpoints of one architecture share the header; their weights differ."""
    import os

    from customcrafter.loading import KEY_SAMPLE_BYTES, KEY_SAMPLE_CHUNKS, _cache_key

    checkpoint, size = tmp_path / "model.ckpt", 4 * KEY_SAMPLE_CHUNKS * KEY_SAMPLE_BYTES
    old = bytes(size)
    new = old[:KEY_SAMPLE_BYTES] + b"\x01" * (size - 2 * KEY_SAMPLE_BYTES) + old[-KEY_SAMPLE_BYTES:]
    checkpoint.write_bytes(old)
    before, key = checkpoint.stat(), _cache_key(checkpoint)
    target = checkpoint if how == "cp -p" else tmp_path / ".model.ckpt.rsync"
    target.write_bytes(new)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    target.replace(checkpoint)
    after = checkpoint.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert _cache_key(checkpoint) != key


def test_metadata_changes_keep_the_cache_key(tmp_path):
    """A chmod, a hard link (DVC's cache links files) or a volume's ownership pass changes the ctime, not the
    weights: the converted folder (GBs, minutes) stays valid."""
    import os

    from customcrafter.loading import _cache_key

    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(os.urandom(3 * 1024 * 1024))
    key = _cache_key(checkpoint)
    checkpoint.chmod(0o600)
    os.link(checkpoint, tmp_path / "linked.ckpt")
    assert _cache_key(checkpoint) == key


def test_converted_folder_records_the_converter_version_and_loads(fixtures_dir, tmp_path):
    from customcrafter.convert import CONVERTER_VERSION
    from customcrafter.pipeline import VideoCrafter2Pipeline

    folder = convert_checkpoint(fixtures_dir / "tiny_lvdm_checkpoint.safetensors", tmp_path / "out",
                                config=fixtures_dir / "tiny_lvdm_config.yaml", components=["unet", "vae"])
    assert json.loads((folder / "model_index.json").read_text())["_customcrafter_converter"] == CONVERTER_VERSION
    pipe = VideoCrafter2Pipeline.from_pretrained(folder)
    assert pipe.unet is not None and pipe.text_encoder is None


def test_disk_full_while_writing_names_the_output_and_leaves_nothing(fixtures_dir, tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as 'Error while serializing: I/O error: ...' without any file name."""
    from safetensors import SafetensorError

    from customcrafter.models.unet import VideoCrafter2UNet

    def disk_full(self, folder, **kwargs):
        (Path(folder)).mkdir(parents=True)
        (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(VideoCrafter2UNet, "save_pretrained", disk_full)
    out = tmp_path / "out"
    assert _cli(*_convert_args(fixtures_dir / "tiny_lvdm_checkpoint.safetensors", out, fixtures_dir)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out}: could not write the converted model" in err[0], err
    assert "No space left on device" in err[0] and "GB free" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == []  # no folder, no temporary


def test_a_read_only_cache_fails_before_loading_the_checkpoint_naming_the_cache(tmp_path, monkeypatch):
    import errno
    import tempfile

    import customcrafter.convert as convert
    from customcrafter.loading import converted_checkpoint_dir

    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"weights")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(kwargs.get("dir")))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(convert, "load_original_state_dict", lambda path: pytest.fail("loaded before the check"))
    with pytest.raises(OSError, match=r"cannot write into .* \(Read-only file system\).*CUSTOMCRAFTER_CACHE"):
        converted_checkpoint_dir(checkpoint, cache_dir=tmp_path / "cache")


class _TrainingHyperParameters:  # a class of the training code (a Lightning checkpoint's hyper-parameters)
    def __init__(self):
        self.lr = 1e-5


def test_a_lightning_training_checkpoint_converts_without_running_its_objects(fixtures_dir, tiny_ckpt, tmp_path):
    """Beside state_dict a training .ckpt pickles objects of its training code; weights_only refuses the whole file
    ('not a readable PyTorch checkpoint (Weights only load failed. ...)'). They are skipped, never constructed."""
    import argparse

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_ckpt, "hyper_parameters": argparse.Namespace(lr=1e-5), "global_step": 3,
                "callbacks": {"ModelCheckpoint": _TrainingHyperParameters()}}, ckpt)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(ckpt, weights_only=True)  # what a plain weights-only load does
    main(_convert_args(ckpt, tmp_path / "from_ckpt", fixtures_dir, components="unet"))
    a = load_file(str(tmp_path / "from_ckpt" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a and all(torch.isfinite(v).all() for v in a.values())


def test_a_checkpoint_with_non_tensor_state_dict_values_names_them(tmp_path, capsys):
    import argparse

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": argparse.Namespace()}}, ckpt)
    assert _cli("convert", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out"), "--components", "unet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no state_dict of tensors inside" in err[0] and "\x1b" not in err[0], err


@pytest.mark.parametrize("case", ["safetensors_named_ckpt", "pickle_named_safetensors"])
def test_the_format_is_read_from_the_file_not_its_name(case, fixtures_dir, tiny_ckpt, tmp_path):
    """A safetensors file saved as model.ckpt failed as 'not a readable PyTorch checkpoint ()'; a torch.save file
    named .safetensors as 'not a readable safetensors file (... header too large)'."""
    import shutil

    if case == "safetensors_named_ckpt":
        ckpt = tmp_path / "model.ckpt"
        shutil.copy(fixtures_dir / "tiny_lvdm_checkpoint.safetensors", ckpt)
    else:
        ckpt = tmp_path / "model.safetensors"
        torch.save({"state_dict": tiny_ckpt}, ckpt)
    main(_convert_args(ckpt, tmp_path / "out", fixtures_dir, components="unet"))
    ours = load_file(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"))
    reference = convert_checkpoint(fixtures_dir / "tiny_lvdm_checkpoint.safetensors", tmp_path / "reference",
                                   config=fixtures_dir / "tiny_lvdm_config.yaml", components=["unet"])
    expected = load_file(str(reference / "unet" / "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in ours)


@pytest.fixture
def ema_ckpt(tiny_ckpt, tmp_path) -> Path:
    """The tiny checkpoint as LVDM training with EMA saves it: LitEma's copies of the UNet weights (here the weights
    negated, exactly, to tell them apart) under their names without dots, and its bookkeeping."""
    from customcrafter.convert import ema_key

    sd = dict(tiny_ckpt)
    sd.update({ema_key(k): -v for k, v in tiny_ckpt.items() if k.startswith("model.diffusion_model.")})
    sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)})
    path = tmp_path / "ema.safetensors"
    save_file(sd, str(path))
    return path


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_a_checkpoint_with_ema_weights_converts_the_trained_or_the_averaged_unet(fixtures_dir, ema_ckpt, tmp_path,
                                                                                  caplog):
    """LitEma's `model_ema.*` keys failed the conversion as unexpected keys."""
    import logging

    from customcrafter.convert import ema_key

    assert ema_key("model.diffusion_model.out.2.weight") == "model_ema.diffusion_modelout2weight"
    reference = convert_checkpoint(fixtures_dir / "tiny_lvdm_checkpoint.safetensors", tmp_path / "reference",
                                   config=fixtures_dir / "tiny_lvdm_config.yaml", components=["unet", "vae"])
    caplog.set_level(logging.INFO)
    main(_convert_args(ema_ckpt, tmp_path / "trained", fixtures_dir))
    main([*_convert_args(ema_ckpt, tmp_path / "averaged", fixtures_dir), "--ema"])
    expected, trained, averaged = (_unet_weights(f) for f in (reference, tmp_path / "trained", tmp_path / "averaged"))
    assert trained.keys() == averaged.keys() == expected.keys()
    assert all(torch.equal(trained[k], expected[k]) for k in expected)
    assert all(torch.equal(averaged[k], -expected[k]) for k in expected)
    assert any(not torch.equal(averaged[k], trained[k]) for k in expected)
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert load_file(str(tmp_path / "averaged" / vae)).keys() == load_file(str(reference / vae)).keys()
    assert f"skipped {len(expected)} EMA weight(s)" in caplog.text


@pytest.mark.parametrize("case", ["incomplete", "no_ema_weights", "no_unet"])
def test_ema_conversion_errors_name_what_is_missing(case, fixtures_dir, ema_ckpt, tiny_ckpt, tmp_path, capsys):
    from customcrafter.convert import ema_key

    ckpt, components = ema_ckpt, "unet,vae"
    missing = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    expected = f"the EMA weights lack 1 UNet parameter(s): {missing} (looked for as model_ema."
    if case == "incomplete":
        sd = load_file(str(ema_ckpt))
        del sd[ema_key(missing)]
        save_file(sd, str(ckpt))
    elif case == "no_ema_weights":
        ckpt, expected = fixtures_dir / "tiny_lvdm_checkpoint.safetensors", "no EMA weights (model_ema.*)"
    else:
        components, expected = "vae", "EMA weights are the UNet's; --ema needs unet"
    assert _cli(*_convert_args(ckpt, tmp_path / "out", fixtures_dir, components), "--ema") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_ema_choice_is_part_of_the_conversion_cache_key(tmp_path, monkeypatch):
    import customcrafter.convert as convert
    from customcrafter.loading import resolve_base_model

    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"weights")
    conversions = []

    def fake_convert(source, output, ema=False, **kwargs):
        conversions.append(ema)
        output.mkdir(parents=True)
        (output / "model_index.json").write_text(json.dumps({"ema": ema}))

    monkeypatch.setattr(convert, "convert_checkpoint", fake_convert)
    trained = resolve_base_model(str(checkpoint), cache_dir=tmp_path)
    averaged = resolve_base_model(str(checkpoint), cache_dir=tmp_path, ema=True)
    assert resolve_base_model(str(checkpoint), cache_dir=tmp_path, ema=True) == averaged  # cached
    assert trained != averaged and conversions == [False, True]
    assert json.loads((averaged / "model_index.json").read_text()) == {"ema": True}
    with pytest.raises(ValueError, match="tiny: ema chooses the weights when a checkpoint is converted"):
        resolve_base_model("tiny", ema=True)

"""The builder (ldm/generation/builder/): a front end's plain values in, a checked run out, with no
front end's knowledge: errors name the values' fields, never a flag; files are read once."""
from __future__ import annotations

import importlib

import pytest
from PIL import Image

from ldm.generation import generate, load_model
from ldm.errors import InvalidValue, SettingsError
from ldm.generation.builder import RunValues, SharingValues, prepare_run
from ldm.generation.reference import Reference
from tests.conftest import TINY_CONFIG


@pytest.fixture
def values(tiny_ckpt, tmp_path) -> RunValues:
    return RunValues(prompt="a chair", config=str(TINY_CONFIG), ckpt=str(tiny_ckpt), device="cpu", steps=2,
                     batch_size=2, n_iter=1, outdir=str(tmp_path / "out"))


def test_values_become_a_checked_request_with_the_models_defaults_filled_in(values, tmp_path):
    run = prepare_run(RunValues(**{**values.__dict__, "scale": None, "steps": None}))
    assert (run.request.prompt, run.request.batch_size, run.request.steps, run.request.scale) == ("a chair", 2, 50, 7.5)
    assert run.output.folder == tmp_path / "out" and not (tmp_path / "out").exists()  # checked, not made
    assert run.spec.geometry.channels == 4 and run.device.type == "cpu"


def test_an_option_without_sharing_names_both_fields_not_flags(values):
    with pytest.raises(SettingsError) as error:
        prepare_run(RunValues(**{**values.__dict__, "sharing": SharingValues(mode="anchor")}))
    assert str(error.value) == ("sharing.mode only applies together with sharing.groups GROUPS; add sharing.groups "
                                "(e.g. all) or drop sharing.mode")
    assert error.value.describe({"sharing.mode": "mode", "sharing.groups": "groups"}).startswith(
        "mode only applies together with groups")


def test_a_bad_value_is_an_invalid_value_naming_its_field(values):
    with pytest.raises(InvalidValue) as error:
        prepare_run(RunValues(**{**values.__dict__, "eta": 5.0}))
    assert error.value.field == "eta"


def test_a_reference_is_read_once_and_generate_does_not_read_it_again(values, tmp_path, monkeypatch):
    picture = tmp_path / "picture.png"
    Image.new("RGB", (64, 64), "red").save(picture)
    run = prepare_run(RunValues(**{**values.__dict__, "references": (str(picture),),
                                   "sharing": SharingValues(groups="all", mode="anchor")}))
    assert [type(r) for r in run.request.references] == [Reference]

    def read_again(path):
        raise AssertionError(f"{path} was read a second time")

    monkeypatch.setattr(importlib.import_module("ldm.generation.generate"), "read_reference", read_again)
    result = generate(load_model(run.spec, run.ckpt, device="cpu", verbose=False), run.request)
    assert result.metadata["references"] == ["picture.png"] and len(result.images) == 2

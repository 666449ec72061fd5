"""The web page's server (ldm/app/, scripts/app.py) over HTTP, without a browser: the page's images are
txt2img's images for the same settings, bad values are the CLI's one line and write nothing, the
form follows the CLI's shared-attention options, and the server only answers on 127.0.0.1."""
from __future__ import annotations

import http.client
import json
import math
import shlex
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ldm.app.form import PAGE_SET_FLAGS, basic_fields, form_values, sharing_fields
from ldm.app.server import PAGE_LIMITS, App, serve
from ldm.cli import add_shared_attention_arguments, command_flags, run_values
from ldm.generation import load_demo_model, read_png_metadata
from ldm.generation.builder import RunValues, with_model_defaults
from tests.conftest import load_script

txt2img = load_script("txt2img")
app_script = load_script("app")


@pytest.fixture(scope="module")
def demo_model():
    return load_demo_model()


@pytest.fixture(scope="module")
def page(demo_model, tmp_path_factory):
    """The page's server for the demo model on a free port, serving in a thread."""
    outdir = tmp_path_factory.mktemp("app")
    server = serve(App(demo_model, RunValues(demo=True, device="cpu", limits=PAGE_LIMITS), outdir), 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def request(server, method: str, path: str, body: Any = None, host: str | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*server.server_address, timeout=60)
    own = f"127.0.0.1:{server.server_address[1]}"
    headers = {"Content-Type": "application/json", "Host": host or own, "Origin": f"http://{own}"}
    connection.request(method, path, None if body is None else json.dumps(body), headers)
    response = connection.getresponse()
    return response.status, response.read()


def submit(server, form: dict[str, Any]) -> dict[str, Any]:
    """POST a form and follow its job to the end; the final status."""
    status, body = request(server, "POST", "/generate", form)
    assert status == 200, body
    job = json.loads(body)["job"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = json.loads(request(server, "GET", f"/status/{job}")[1])
        if state["state"] != "running":
            return state
        time.sleep(0.1)
    raise AssertionError("the generation did not finish within 2 minutes")


def folder_of(server, result: dict[str, Any]) -> Path:
    return server.app.outdir / Path(result["grid"].removeprefix("/files/")).parent


def page_samples(server, result: dict[str, Any]) -> list[bytes]:
    """The PNG files of every image on the page, fetched as the page's download links fetch them."""
    downloads = []
    for row in result["rows"]:
        for image in row["images"]:
            status, body = request(server, "GET", image["url"])
            assert status == 200
            downloads.append(body)
    return downloads


def pixels_and_parameters(png: bytes | Path, tmp_path: Path) -> tuple[np.ndarray, dict]:
    path = png if isinstance(png, Path) else tmp_path / "download.png"
    if not isinstance(png, Path):
        path.write_bytes(png)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), read_png_metadata(path)


FORM = {"prompt": "a blue lamp", "--n_samples": "2", "--seed": "7", "--ddim_steps": "4", "--scale": "3",
        "groups": ["mid", "up.32"], "--shared-attn-mode": "anchor", "--shared-attn-steps": "0:0.8"}


def test_page_images_equal_txt2img_images_for_the_same_settings(page, tmp_path):
    state = submit(page, FORM)
    assert state["state"] == "done", state["error"]
    cli_dir = tmp_path / "cli"
    written = txt2img.main(["--demo", "--device", "cpu", "--prompt", "a blue lamp", "--n_samples", "2", "--seed", "7",
                            "--ddim_steps", "4", "--scale", "3", "--shared-attn", "mid,up.32", "--shared-attn-mode",
                            "anchor", "--shared-attn-steps", "0:0.8", "--compare", "--outdir", str(cli_dir)])
    cli_samples = [path for path in written if path.parent.name == "samples"]
    downloads = page_samples(page, state["result"])
    assert len(downloads) == len(cli_samples) == 4  # 2 seeds, without and with sharing
    for download, cli_file in zip(downloads, cli_samples):
        page_pixels, page_parameters = pixels_and_parameters(download, tmp_path)
        cli_pixels, cli_parameters = pixels_and_parameters(cli_file, tmp_path)
        np.testing.assert_array_equal(page_pixels, cli_pixels)
        assert page_parameters == cli_parameters
    # image 0 is the anchor (it sees only itself); image 1 sees it, so sharing changed image 1
    shared = pixels_and_parameters(downloads[3], tmp_path)[0]
    assert not np.array_equal(shared, pixels_and_parameters(downloads[1], tmp_path)[0])


def test_page_starts_from_the_demo_models_defaults(page):
    from ldm.generation.model import DEMO_SCALE
    values = {field.flag: field.value for field in page.app.basic}
    assert (values["--scale"], values["--ddim_steps"], values["--n_samples"]) == (str(DEMO_SCALE), "25", "4")
    assert f'value="{DEMO_SCALE}"' in page.app.page.decode()


def test_page_shows_both_rows_with_the_prompt_and_seed_of_every_column(page):
    result = submit(page, {**FORM, "--shared-attn-mode": "", "--shared-attn-steps": ""})["result"]
    assert [row["label"] for row in result["rows"]] == ["no sharing (seeds 7-8)", "shared (seeds 7-8)"]
    for row in result["rows"]:
        assert [(image["prompt"], image["seed"]) for image in row["images"]] == [("a blue lamp", 7), ("a blue lamp", 8)]
    assert json.loads(result["settings"])["shared_attention"]["groups"] == "mid,up.32"


def test_per_image_prompts_equal_the_txt2img_command_the_page_shows(page, tmp_path):
    form = {"prompt": "a red chair\n\na red table\na red vase\n", "per_image": True, "--n_samples": "9",
            "--ddim_steps": "3", "groups": ["all"]}
    state = submit(page, form)
    assert state["state"] == "done", state["error"]
    result = state["result"]
    assert [image["prompt"] for image in result["rows"][1]["images"]] == ["a red chair", "a red table", "a red vase"]
    command = shlex.split(result["command"])
    assert command[:2] == ["python", "scripts/txt2img.py"]
    written = txt2img.main(command[2:])  # writes beside the page's files, under new numbers
    cli_samples = [path for path in written if path.parent.name == "samples"]
    for download, cli_file in zip(page_samples(page, result), cli_samples, strict=True):
        np.testing.assert_array_equal(pixels_and_parameters(download, tmp_path)[0],
                                      pixels_and_parameters(cli_file, tmp_path)[0])
    assert (folder_of(page, result) / "prompts.txt").read_text().split("\n")[:3] == [
        "a red chair", "a red table", "a red vase"]


@pytest.mark.parametrize("change, message", [
    ({"--ddim_steps": "0"}, "error: --ddim_steps 0: must be a whole number of at least 1"),
    ({"--seed": "abc"}, "error: --seed abc: must be a whole number"),
    ({"groups": ["sideways"]}, "error: --shared-attn sideways: "),
    ({"groups": [], "--shared-attn-mode": "anchor"}, "error: --shared-attn-mode only applies together with"),
    ({"--shared-attn-steps": "0.9:0.95"}, "error: --shared-attn-steps 0.9:0.95: the step window selects none"),
    ({"--scale": "nan"}, "error: --scale nan: must be a finite number"),
    ({"per_image": True, "prompt": " \n "}, "error: the prompt box is empty"),
    ({"groups": "up"}, "error: the layer groups must be a list of group names"),
])
def test_a_bad_value_is_the_clis_one_line_and_writes_nothing(page, change, message):
    before = sorted(page.app.outdir.rglob("*"))
    status, body = request(page, "POST", "/generate", {**FORM, **change})
    assert status == 400
    error = json.loads(body)["error"]
    assert error.startswith(message) and "\n" not in error and "Traceback" not in error
    assert sorted(page.app.outdir.rglob("*")) == before


def test_an_error_during_generation_is_the_clis_one_line_and_writes_nothing(page):
    before = sorted(page.app.outdir.rglob("*"))
    state = submit(page, {**FORM, "--scale": "1e30"})  # passes the checks, overflows while sampling
    assert state["state"] == "error"
    assert state["error"].startswith("error: sampling gave NaN or infinite latents") and "\n" not in state["error"]
    assert "guidance scale 1e+30" in state["error"]
    assert sorted(page.app.outdir.rglob("*")) == before


def test_a_second_generation_waits_for_the_first_instead_of_running_beside_it(page):
    status, body = request(page, "POST", "/generate", {**FORM, "--ddim_steps": "30"})
    assert status == 200
    second_status, second_body = request(page, "POST", "/generate", FORM)
    assert (second_status, json.loads(second_body)["error"]) == (
        400, "error: a generation is already running; wait until it has finished, or cancel it")
    while json.loads(request(page, "GET", f"/status/{json.loads(body)['job']}")[1])["state"] == "running":
        time.sleep(0.1)


def test_every_shared_attention_option_of_the_cli_is_a_field_on_the_page(page):
    import argparse
    parser = argparse.ArgumentParser(add_help=False)
    add_shared_attention_arguments(parser)
    cli_flags = {max(a.option_strings, key=len) for a in parser._actions} - set(PAGE_SET_FLAGS)
    assert cli_flags and {field.flag for field in sharing_fields()} == cli_flags
    html = page.app.page.decode()
    for flag in cli_flags:
        assert f'data-flag="{flag}"' in html
    for group in ("all", "down", "mid", "up", "up.32", "16"):
        assert f'name="groups" value="{group}"' in html


def test_form_values_keep_values_starting_with_a_minus_and_leave_empty_fields_out():
    base = with_model_defaults(RunValues(demo=True))
    values = form_values({"prompt": "-a  chair\n", "groups": ["up"], "--shared-attn-strength": "-inf",
                          "--shared-attn-mode": ""}, sharing_fields(), base)
    assert (values.prompt, values.sharing.groups, values.sharing.strength, values.compare) == ("-a chair", "up",
                                                                                              -math.inf, True)
    assert values.sharing.mode is None
    assert command_flags(values) == ["--demo", "--prompt=-a chair", "--shared-attn", "up", "--compare",
                                     "--shared-attn-strength=-inf"]


@pytest.mark.parametrize("form", [
    FORM,
    {"prompt": "a red chair\na red table", "per_image": True, "--seed": "3", "groups": ["all"],
     "--shared-attn-adain": True, "--shared-attn-reference-cache": "off", "--negative-prompt": "-blurry"},
])
def test_the_command_the_page_shows_gives_txt2img_the_values_of_the_form(form, tmp_path):
    """The page's equivalent command, parsed by txt2img, is the page's own values (the prompt file aside)."""
    base = with_model_defaults(RunValues(demo=True, device="cpu"))
    values = form_values(form, [*basic_fields(base), *sharing_fields()], base)
    prompt_file = tmp_path / "prompts.txt"
    parsed = run_values(txt2img.parse_args(command_flags(values, prompt_file=str(prompt_file))))
    if values.prompts is not None:
        assert (parsed.prompt_file, parsed.batch_size) == (str(prompt_file), len(values.prompts))
        parsed = replace(parsed, prompt_file=None, prompts=values.prompts, prompt=values.prompt)
    assert replace(parsed, outdir=None, limits=values.limits) == values


def test_server_listens_on_loopback_and_refuses_other_host_names(page):
    assert page.server_address[0] == "127.0.0.1"
    status, body = request(page, "GET", "/")
    assert status == 200 and b"<form" in body
    assert request(page, "GET", "/", host="attacker.example:80")[0] == 403


def test_files_outside_the_output_folder_are_not_served(page):
    for path in ("/files/../../../etc/passwd", "/files/%2e%2e/%2e%2e/etc/hostname", "/files/"):
        assert request(page, "GET", path)[0] == 404


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "error: --port 70000: give a port from 1 to 65535"),
    (["--demo", "--ckpt", "x.ckpt"], "error: --demo uses the shipped demo model"),
    (["--ckpt", "missing.ckpt"], "error: checkpoint not found: missing.ckpt"),
])
def test_app_script_refuses_bad_flags_with_one_line_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app_script.run_cli(app_script.main, argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(message)

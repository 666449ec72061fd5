"""A local web page for making consistent sets with batch-shared self-attention.

    python scripts/app.py            # the demo model; open the address it prints

One prompt for every image (or one per image), the sampling settings and every shared-attention
option of txt2img on one form; the result is the same seeds without and with sharing, side by side,
each image downloadable as the PNG txt2img would write, and the txt2img command that makes them.
The page's values are checked as txt2img checks its flags, by the same builder (see ldm/app/). It listens on 127.0.0.1
only and fetches nothing from the network. Default model: the demo model; --config/--ckpt for SD v1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.app.server import PAGE_LIMITS, App, serve  # noqa: E402
from ldm.cli import ArgumentParser, UsageError, add_model_arguments, run_cli  # noqa: E402
from ldm.generation import check_output_folder, choose_device, load_model  # noqa: E402
from ldm.generation.builder import RunValues, check_model, model_defaults, with_model_defaults  # noqa: E402
from ldm.generation.limits import Limits  # noqa: E402

DEFAULT_PORT = 7860


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--outdir", type=str, default="outputs/app-samples",
                        help="folder for the runs (run-0000, run-0001, ...)")
    parser.add_argument("--no-limits", action="store_true",
                        help=f"lift the page's limits ({PAGE_LIMITS.max_images:g} images and {PAGE_LIMITS.max_steps:g} "
                             f"steps per generation, {PAGE_LIMITS.max_prompt_chars:g} characters per prompt)")
    opt = parser.parse_args(argv)
    model_defaults(opt.demo, opt.config, opt.ckpt)  # --demo with another model is refused
    if not 0 <= opt.port <= 65535:
        raise UsageError(f"--port {opt.port}: give a port from 1 to 65535, or 0 for a free one")
    return opt


def model_values(opt: argparse.Namespace) -> RunValues:
    """The builder's values that choose this page's model, device and precision (txt2img's flags for them),
    and its limits."""
    return with_model_defaults(RunValues(demo=not (opt.config or opt.ckpt), config=opt.config, ckpt=opt.ckpt,
                                         use_ema=opt.use_ema, device=opt.device, precision=opt.precision,
                                         limits=Limits.none() if opt.no_limits else PAGE_LIMITS))


def main(argv: Optional[Sequence[str]] = None) -> None:
    opt = parse_args(argv)
    base = model_values(opt)
    # txt2img's checks of the model, the device and the folder, before the slow load
    model_files = check_model(base.config, base.ckpt, demo=base.demo)
    device = choose_device(base.device)
    check_output_folder(opt.outdir)
    model = load_model(model_files.spec, model_files.ckpt, device=device, use_ema=base.use_ema, verbose=False)
    try:
        server = serve(App(model, base, Path(opt.outdir)), opt.port)
    except OSError as error:
        raise UsageError(f"--port {opt.port}: cannot listen on 127.0.0.1:{opt.port} ({error.strerror or error}); "
                         "pass another port, or --port 0 for a free one") from None
    print(f"The page is at {server.url} (Ctrl+C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    run_cli(main)

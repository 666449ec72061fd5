"""A local web page for making consistent sets (`scripts/app.py`), built on the command line's own checks.

The page is a front end at the level of `ldm/cli.py`: its form is made from txt2img's argparse
options (`form`), a submitted form becomes the same `RunValues` txt2img makes of its flags, checked by
the same builder (`ldm.generation.builder.prepare_run`), and the checked `GenerationRequest` is generated
with `ldm.generation.generate` on a model loaded once (`server`). So the page's images are the CLI's
images for the same settings, and an option added to the CLI's shared-attention group appears on
the page without further work.

Standard library only (http.server, inline HTML, CSS and JavaScript): nothing is fetched from the
network, nothing is reported anywhere, and the server listens on 127.0.0.1 only.
"""

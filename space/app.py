"""A Hugging Face Space's entry point: the web UI of ldm/app.py for the model named by the Space's
LDM_MODEL variable (a Hub id, or a pipeline folder uploaded with the Space).

A Space runs `python app.py` with the `ldm` folder copied beside this file (see the README's
"Publishing it as a Space"); it serves on 0.0.0.0:7860, where the Space's proxy looks.
"""

import atexit
import os
import shutil
import sys
import tempfile

from ldm.app import build, launch, parse_args, serve

server, config = parse_args(["--model", os.environ.get("LDM_MODEL", "outputs/unet-demo"), "--host", "0.0.0.0"])
folder = tempfile.mkdtemp(prefix="ldm-app-")  # the requests' PNGs
atexit.register(shutil.rmtree, folder, ignore_errors=True)
try:
    demo = build(serve(config, folder))
except ValueError as error:  # the Space's log shows the reason, not a traceback
    sys.exit(f"ldm.app: error: {error}")

if __name__ == "__main__":
    launch(demo, server, folder)

"""The app's start: the page is served before the text model is loaded; a text model that cannot load
ends the start as a failed one (a clear message, exit status 2), after the page was up."""

import subprocess
import sys
import time
import urllib.request

from harness.server import ROOT, free_port


def test_a_text_model_that_cannot_load_ends_the_start_with_a_clear_message(tmp_path):
    port = free_port()
    missing = tmp_path / "no-such-model"
    missing.mkdir()  # a folder without a checkpoint: loading it fails, and not for want of the hub
    app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-dir", str(tmp_path / "data"),
                            "--text-model", str(missing), "--speech-model", "none", "--voice", "none"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        served = False
        while app.poll() is None and not served:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    served = response.status == 200
            except OSError:
                time.sleep(0.2)
        output, _ = app.communicate(timeout=300)
    finally:
        app.kill()
    assert served  # the page came first, while the model was loading
    assert app.returncode == 2, output[-3000:]
    assert f"Cannot start: Could not load the text model '{missing}'" in output
